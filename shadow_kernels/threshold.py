"""Input sparsity by magnitude: ``y = (a * [|a| > t]) @ weight_t + bias``, reading only the rows of ``weight_t`` whose
input entry is kept (the threshold mode's projections, TEAL's idea).

``weight_t`` is W transposed ([K, M]: K inputs, M outputs), so the weights of one input are one contiguous row. A
batch keeps the union of its rows' entries (the GEMV takes one index list). Two launches: one program compacts the
kept entries (a compare against the threshold, a running prefix sum for each kept input's slot) into an index
list, a count and the kept values; then the gather-columns GEMV reads those rows. The composed PyTorch ops did the
same in about five launches before the GEMV (abs, compare, any, the index list, a gather of the kept values), and
a decode step runs four such projections per layer.

The GEMV is launched without preloading its index list (``preload=False``): under programmatic dependent launch a
preloading GEMV reads its index list before the kernel just before it finishes, and here that kernel writes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, next_pow2
from .gather_cols import gather_cols_gemv, gather_cols_gemv_ref
from .topk import mask_to_indices_ref


@triton.jit
def _threshold_select_kernel(a_ptr, t_ptr, h_ptr, idx_ptr, count_ptr, B, K, stride_ab, stride_hb,
                             BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    # One program: each block of inputs is kept where any batch row's magnitude exceeds the threshold; a running
    # prefix sum gives each kept input its slot, so the index list comes out sorted. Slots past the count are zeroed
    # (index 0, value 0), as the index lists of the other kernels are padded.
    offs = tl.arange(0, BLOCK)
    offs_b = tl.arange(0, BLOCK_B)
    t = tl.load(t_ptr)
    total = tl.program_id(0) * 0
    for start in range(0, K, BLOCK):
        cols = start + offs
        ok = cols < K
        keep = tl.zeros([BLOCK], dtype=tl.int32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            m = (rows[:, None] < B) & ok[None, :]
            x = tl.load(a_ptr + rows[:, None] * stride_ab + cols[None, :], mask=m, other=0.0)
            keep = keep | tl.max(((tl.abs(x) > t) & m).to(tl.int32), axis=0)
        slot = total + tl.cumsum(keep, axis=0) - 1
        live = keep != 0
        tl.store(idx_ptr + slot, cols.to(tl.int32), mask=live)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            m = (rows[:, None] < B) & ok[None, :]
            x = tl.load(a_ptr + rows[:, None] * stride_ab + cols[None, :], mask=m, other=0.0)
            tl.store(h_ptr + rows[:, None] * stride_hb + slot[None, :], x, mask=m & live[None, :])
        total += tl.sum(keep, axis=0)
    for start in range(0, K, BLOCK):
        slots = start + offs
        pad = (slots >= total) & (slots < K)
        tl.store(idx_ptr + slots, tl.zeros([BLOCK], dtype=tl.int32), mask=pad)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            tl.store(h_ptr + rows[:, None] * stride_hb + slots[None, :], tl.zeros([BLOCK_B, BLOCK], dtype=tl.float32)
                     .to(h_ptr.dtype.element_ty), mask=(rows[:, None] < B) & pad[None, :])
    tl.store(count_ptr, total)


def _check(weight_t, a, threshold, bias, any_device):
    check_float("weight_t", weight_t, ndims=(2,), last_contiguous=True, any_device=any_device)
    check_float("a", a, ndims=(1, 2), dtype=weight_t.dtype, device=weight_t.device, any_device=any_device)
    K = weight_t.shape[0]
    if a.shape[-1] != K:
        raise ValueError(f"a has {a.shape[-1]} inputs but weight_t has {K} rows (one per input)")
    if not isinstance(threshold, torch.Tensor) or threshold.numel() != 1:
        got = tuple(threshold.shape) if isinstance(threshold, torch.Tensor) else type(threshold).__name__
        raise TypeError(f"threshold must be a one-element tensor (on the device, so a step stays capturable), got "
                        f"{got}")
    check_device("threshold", threshold, weight_t.device, any_device)
    if bias is not None:
        check_float("bias", bias, ndims=(1,), dtype=weight_t.dtype, device=weight_t.device, any_device=any_device)
        if bias.shape[0] != weight_t.shape[1]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight_t has {weight_t.shape[1]} outputs")


def threshold_select(a: torch.Tensor, threshold: torch.Tensor):
    """The inputs of ``a`` [B, K] kept by ``|a| > threshold`` in any row, as ``(h [B, K], idx int32 [K],
    count int32 [1])``: the kept values in slots ``0 .. count - 1`` of ``h`` and their input numbers, ascending, in
    ``idx`` (both zero past the count). One Triton launch."""
    B, K = a.shape
    h = torch.empty((B, K), dtype=a.dtype, device=a.device)
    idx = torch.empty((K,), dtype=torch.int32, device=a.device)
    count = torch.empty((1,), dtype=torch.int32, device=a.device)
    if B == 0 or K == 0:
        idx.zero_()
        count.zero_()
        return h.zero_(), idx, count
    a = a.contiguous()
    t = threshold.reshape(1).to(a.dtype)
    _threshold_select_kernel[(1,)](a, t, h, idx, count, B, K, a.stride(0), h.stride(0),
                                   BLOCK_B=min(next_pow2(B), 8), BLOCK=1024)
    return h, idx, count


def threshold_cols_gemv(weight_t, a, threshold, bias=None, *, validate=True):
    """``(a * [|a| > threshold]) @ weight_t + bias`` reading only the kept inputs' rows of ``weight_t`` [K, M];
    ``a`` [K] or [B, K] in the weight's dtype (a batch keeps the union of its rows' inputs); ``threshold``: a
    one-element tensor on the device (an exact zero input is always dropped). Returns ``(y, count)``: y [M] or
    [B, M] in the weight dtype (fp32 accumulation), count the kept inputs (int32 [1], on the device)."""
    if validate:
        _check(weight_t, a, threshold, bias, any_device=False)
    a2 = a if a.dim() == 2 else a[None]
    h, idx, count = threshold_select(a2, threshold)
    y = gather_cols_gemv(weight_t, h, idx, bias, count, validate=False)
    return (y if a.dim() == 2 else y[0]), count


def threshold_cols_gemv_ref(weight_t, a, threshold, bias=None, *, validate=True):
    """Plain-PyTorch reference of :func:`threshold_cols_gemv` (same signature and results; capturable)."""
    if validate:
        _check(weight_t, a, threshold, bias, any_device=True)
    a2 = a if a.dim() == 2 else a[None]
    keep = (a2.abs() > threshold.to(a2.dtype)).any(dim=0, keepdim=True)  # [1, K]
    sel = mask_to_indices_ref(keep, weight_t.shape[0], validate=False)
    idx = sel.idx[0]
    y = gather_cols_gemv_ref(weight_t, a2.index_select(1, idx.long()), idx, bias, count=sel.count, validate=False)
    return (y if a.dim() == 2 else y[0]), sel.count
