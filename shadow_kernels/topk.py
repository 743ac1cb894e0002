"""Top-k selection, local (per layer) and global (one budget across layers), as masks and as the
padded index lists that the GEMV kernels take.

Index format (``LayerIndices``): for scores of L layers with n units each,
- ``idx``   int32 [L, k_max]: row l holds the selected units of layer l in ascending order in its
  first ``count[l]`` slots and 0 in the rest (a valid index, never read by the kernels);
- ``count`` int32 [L] on the device.
Local top-k selects exactly k per layer (k_max = k). Global top-k selects exactly k over all
L*n scores, so a layer may get anything from 0 to n units: k_max = min(n, k), and the kernels read
``count[l]`` on the device to know how many slots are live. Every shape depends only on (L, n, k),
never on the scores, so selection and the sparse layers can be captured in one CUDA graph.

Selection itself uses ``torch.topk`` (a radix select on the GPU); the Triton kernel here turns a
selection mask into the sorted, padded lists in one launch (a prefix sum per layer), where plain
PyTorch needs a sort or a nonzero (which has a data-dependent shape and cannot be captured).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_device, is_capturing

POLICIES = ("local", "global")


class LayerIndices(NamedTuple):
    idx: torch.Tensor  # int32 [L, k_max], sorted live entries first, zero padding after
    count: torch.Tensor  # int32 [L]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, count) of one layer, in the form gather_rows_gemv/gather_cols_gemv take."""
        return self.idx[layer], self.count[layer : layer + 1]


@triton.jit
def _compact_kernel(mask_ptr, idx_ptr, count_ptr, n, k_max, stride_mask, stride_idx, BLOCK: tl.constexpr):
    # One program per layer: a running prefix sum over the mask gives each selected unit its slot,
    # so the output is sorted by construction.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    total = row * 0
    for start in range(0, n, BLOCK):
        cols = start + offs
        m = tl.load(mask_ptr + row * stride_mask + cols, mask=cols < n, other=0).to(tl.int32)
        slot = total + tl.cumsum(m, axis=0) - 1
        tl.store(idx_ptr + row * stride_idx + slot, cols.to(tl.int32), mask=(m != 0) & (slot < k_max))
        total += tl.sum(m, axis=0)
    for start in range(0, k_max, BLOCK):
        slots = start + offs
        tl.store(idx_ptr + row * stride_idx + slots, tl.zeros([BLOCK], dtype=tl.int32),
                 mask=(slots >= total) & (slots < k_max))
    tl.store(count_ptr + row, tl.minimum(total, k_max))


def _check_scores(scores, validate: bool) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores has dtype {scores.dtype}; expected a floating-point tensor")
    if validate and not is_capturing(scores.device) and bool(torch.isnan(scores).any()):
        n_nan = int(torch.isnan(scores).sum())
        raise ValueError(f"scores holds {n_nan} NaN value(s); top-k over NaN has no meaning, fix the predictor "
                         "or the criterion that produced them")


def _check_k(k, n: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < 0 or k > n:
        raise ValueError(f"k is {k}; expected 0 <= k <= {n} ({what})")


def topk_mask(scores, k, dim=-1, *, validate=True):
    """Boolean mask with exactly k True per row along ``dim`` (local), or with ``dim=None`` exactly
    k True over the whole tensor (global). Ties are broken by ``torch.topk``."""
    _check_scores(scores, validate)
    if dim is None:
        # global: the same selection along the one dimension of the flattened scores
        target, dim, what = scores.reshape(-1), 0, f"the number of scores, {scores.numel()}"
    elif isinstance(dim, int) and -scores.dim() <= dim < scores.dim():
        target, what = scores, f"the size of dim {dim}"
    else:
        raise ValueError(f"dim must be None or an int in [{-scores.dim()}, {scores.dim() - 1}], got {dim!r}")
    _check_k(k, target.shape[dim], what)
    mask = torch.zeros(target.shape, dtype=torch.bool, device=scores.device)
    # scatter_ with a scalar, not `mask[i] = True`: that copies a host tensor, which a CUDA graph
    # capture refuses
    return mask.scatter_(dim, torch.topk(target, k, dim=dim, sorted=False).indices, True).view(scores.shape)


def _check_mask(mask, k_max):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [layers, units], got shape {tuple(mask.shape)}")
    n = mask.shape[1]
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 0 <= k_max <= n:
        raise ValueError(f"k_max must be an int in [0, {n}], got {k_max!r}")


def mask_to_indices(mask, k_max, *, validate=True) -> LayerIndices:
    """Sorted padded index lists of a [L, n] bool mask (Triton, one launch). A row with more than
    k_max True values is an error when validated; unvalidated, its extra entries are dropped."""
    _check_mask(mask, k_max)
    check_device("mask", mask)
    L, n = mask.shape
    if validate and not is_capturing(mask.device) and L > 0:
        most = int(mask.sum(dim=1).max())
        if most > k_max:
            raise ValueError(f"a row of mask has {most} True values but k_max is {k_max}")
    idx = torch.empty((L, k_max), dtype=torch.int32, device=mask.device)
    count = torch.empty((L,), dtype=torch.int32, device=mask.device)
    if L == 0:
        return LayerIndices(idx, count)
    m8 = mask.contiguous().view(torch.uint8)
    _compact_kernel[(L,)](m8, idx, count, n, k_max, m8.stride(0), idx.stride(0) if k_max else 1, BLOCK=1024)
    return LayerIndices(idx, count)


def mask_to_indices_ref(mask, k_max, *, validate=True) -> LayerIndices:
    """Plain-PyTorch reference of :func:`mask_to_indices` (a stable sort, also capturable)."""
    _check_mask(mask, k_max)
    L, n = mask.shape
    cols = torch.arange(n, device=mask.device).expand(L, n)
    keyed = torch.where(mask, cols, n)  # unselected sort to the end
    ordered = torch.sort(keyed, dim=1).values[:, :k_max]
    count = mask.sum(dim=1).clamp(max=k_max).to(torch.int32)
    live = torch.arange(k_max, device=mask.device)[None, :] < count[:, None]
    return LayerIndices(torch.where(live, ordered, 0).to(torch.int32), count)


def _selection(scores, k, policy, validate):
    _check_scores(scores, validate)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [layers, units], got shape {tuple(scores.shape)}")
    L, n = scores.shape
    if policy == "local":
        return topk_mask(scores, k, dim=-1, validate=False), k
    return topk_mask(scores, k, dim=None, validate=False), min(n, k)


def topk_indices(scores, k, policy="local", *, validate=True) -> LayerIndices:
    """Select units from [L, n] scores and return the padded index lists.

    policy "local": exactly k units in every layer. policy "global": exactly k units over all
    layers together, distributed by score (k_max = min(n, k) slots per layer).
    """
    mask, k_max = _selection(scores, k, policy, validate)
    return mask_to_indices(mask, k_max, validate=False)


def topk_indices_ref(scores, k, policy="local", *, validate=True) -> LayerIndices:
    """Plain-PyTorch reference of :func:`topk_indices`."""
    mask, k_max = _selection(scores, k, policy, validate)
    return mask_to_indices_ref(mask, k_max)
