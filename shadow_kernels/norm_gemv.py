"""A norm folded into the GEMV that reads it: ``y = act(norm(x + r) @ W[idx].T + bias[idx])`` in one kernel.

In a pre-norm decoder every attention block and MLP starts with ``z = x + r`` (the residual add), a norm of
``z``, and a GEMV of the result. A GEMV reads its whole input vector anyway, so the norm's statistics can be
summed in the same loop, and the norm's affine part moved onto the weights ahead of time:

    LayerNorm:  y_j = sum_k W_jk (g_k (z_k - mean) * rstd + beta_k) + bias_j
                    = rstd * (sum_k W_jk g_k (z_k - p)  -  (mean - p) * s_j)  +  c_j
                with s_j = sum_k W_jk g_k and c_j = sum_k W_jk beta_k + bias_j (fp32, computed once)
                and p any constant: the row's first element
    RMSNorm:    y_j = rstd * sum_k W_jk g_k z_k  (+ bias_j)

The kernel multiplies each weight tile by ``(z - p) * g``, sums ``z - p`` and its square beside it, and
applies ``mean``/``rstd`` to the finished dot products; the weights themselves are not changed, so prefill, export
and the unfused kernels keep using them. The first program also writes ``z`` (the residual stream the next
block adds to). That removes the add + norm launch before every such GEMV: two launches a decoder layer.

:class:`NormFold` holds what a fold needs for one weight (``s``, ``c``, the norm's parameters); build it
with :func:`fold_norm` after the weights are loaded, and again if they change. The references compute the
norm explicitly (fp32) and then the GEMV, which is the definition the kernel is tested against.

Numerics: the variance is ``E[d^2] - E[d]^2`` with ``d = z - p``, in fp32 over the whole row (clamped at 0):
shifting by an element of the row keeps a large mean from cancelling, there and in ``(mean - p) * s``.
``d * g`` is not rounded to the weight dtype on the batch-1 path (on the tensor-core path of a batch it is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import check_count, check_flag, check_float, check_indices, zero_past_count
from .gather_rows import _check_activation, check_up, launch_rows_gemv

NORM_KINDS = ("layer", "rms")


@dataclass(frozen=True)
class NormFold:
    """One weight's fold of the norm before it (see the module docstring).

    ``kind`` "layer" or "rms"; ``weight`` [K] and ``bias`` [K] (LayerNorm only, may be None) the norm's
    parameters; ``lin_bias`` [N] the GEMV's bias or None; ``eps``; ``rowsum`` fp32 [N] (``sum_k W_jk g_k``,
    LayerNorm only) and ``shift`` fp32 [N] (``W @ beta + lin_bias``) or None when there is neither.
    """

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    lin_bias: torch.Tensor | None
    eps: float
    rowsum: torch.Tensor | None
    shift: torch.Tensor | None
    n_rows: int


def fold_norm(weight, norm_weight, norm_bias=None, bias=None, *, kind: str = "layer", eps: float = 1e-5,
              chunk_rows: int = 8192) -> NormFold:
    """Fold the norm with parameters ``norm_weight`` (and ``norm_bias``) that comes before the GEMV of
    ``weight`` [N, K] (with ``bias`` [N]) into a :class:`NormFold`. Works ``chunk_rows`` rows at a time in
    fp32, so it never holds an fp32 copy of the whole weight."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    check_float("weight", weight, ndims=(2,), any_device=True)
    N, K = weight.shape
    dev = weight.device
    for name, t, n in (("norm_weight", norm_weight, K), ("norm_bias", norm_bias, K), ("bias", bias, N)):
        if t is None:
            if name == "norm_weight":
                raise ValueError("norm_weight is required")
            continue
        check_float(name, t, ndims=(1,), dtype=weight.dtype, device=dev, any_device=True)
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} entries; expected {n}")
    if kind == "rms" and norm_bias is not None:
        raise ValueError("an RMS norm has no bias; got norm_bias")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    rowsum = torch.empty(N, dtype=torch.float32, device=dev) if kind == "layer" else None
    shift = None
    if norm_bias is not None or bias is not None:
        shift = torch.zeros(N, dtype=torch.float32, device=dev) if bias is None else bias.detach().float().clone()
    # an RMS fold without biases has nothing per row: no GPU work, so a decoder may build it inside a capture
    if rowsum is not None or norm_bias is not None:
        with torch.no_grad():
            g = norm_weight.detach().float()
            beta = norm_bias.detach().float() if norm_bias is not None else None
            for i in range(0, N, chunk_rows):
                w = weight.detach()[i: i + chunk_rows].float()
                if rowsum is not None:
                    rowsum[i: i + chunk_rows] = w @ g
                if beta is not None:
                    shift[i: i + chunk_rows] += w @ beta
    return NormFold(kind, norm_weight.detach(), None if norm_bias is None else norm_bias.detach(),
                    None if bias is None else bias.detach(), float(eps), rowsum, shift, N)


def _check(weight, x, idx, fold, residual, count, validate, preload, up=None):
    check_float("weight", weight, ndims=(2,), last_contiguous=True)
    dev = weight.device
    N, K = weight.shape
    check_float("x", x, ndims=(1, 2), dtype=weight.dtype, device=dev, last_contiguous=True)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but weight is [{N}, {K}]; expected x [..., {K}]")
    if residual is not None:
        check_float("residual", residual, ndims=(1, 2), dtype=weight.dtype, device=dev, last_contiguous=True)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {tuple(x.shape)} like x")
    if not isinstance(fold, NormFold):
        raise TypeError(f"fold must be a NormFold (see fold_norm), got {type(fold).__name__}")
    if fold.n_rows != N or fold.weight.shape[0] != K:
        raise ValueError(f"fold was made for a [{fold.n_rows}, {fold.weight.shape[0]}] weight; weight is [{N}, {K}]")
    if fold.weight.device != dev or fold.weight.dtype != weight.dtype:
        raise ValueError(f"fold is {fold.weight.dtype} on {fold.weight.device}; weight is {weight.dtype} on {dev}")
    if up is not None and fold.kind != "rms":
        raise ValueError(f"the SwiGLU GEMV folds an RMS norm; fold.kind is {fold.kind!r}")
    if idx is not None:
        check_indices("idx", idx, n=N, device=dev, validate=validate)
        check_count("count", count, device=dev, upper=idx.shape[0], validate=validate)
    elif count is not None:
        raise ValueError("count needs an index list (idx); with idx=None every row is computed")
    check_flag("preload", preload)


def _run(weight, x, idx, fold, residual, count, relu, preload, up=None):
    x2d = x if x.dim() == 2 else x[None]
    r2d = None if residual is None else (residual if residual.dim() == 2 else residual[None])
    z = torch.empty_like(x2d) if r2d is not None else x2d
    y = launch_rows_gemv(weight, x2d, idx, fold.shift, count, relu, weight.dtype, up=up, preload=preload,
                         norm=fold, residual=r2d, z=z)
    n = weight.shape[0] if idx is None else idx.shape[0]
    return (y.reshape(n), z.reshape(x.shape[-1])) if x.dim() == 1 else (y, z)


def norm_rows_gemv(weight, x, idx, fold: NormFold, residual=None, activation=None, count=None, *,
                   validate: bool = True, preload: bool = False):
    """``(y, z)``: ``z = x + residual`` (``x`` itself when ``residual`` is None) and
    ``y = act(norm(z) @ weight[idx].T + bias[idx])`` with the norm and bias of ``fold``, in one kernel.

    weight [N, K]; x, residual [K] or [B, K] in the weight dtype; idx int32/int64 [k] in [0, N), or None
    for every row; ``activation``, ``count``, ``validate``, ``preload``: as in
    :func:`shadow_kernels.gather_rows_gemv` (``preload`` waits for x and residual, not for the fold).
    Returns y [k] or [B, k] (k = N without idx) in the weight dtype, fp32 accumulation.
    """
    _check(weight, x, idx, fold, residual, count, validate, preload)
    _check_activation(activation)
    return _run(weight, x, idx, fold, residual, count, activation == "relu", preload)


def _normed_ref(x, residual, fold):
    z = x if residual is None else x + residual
    zf = z.float()
    if fold.kind == "layer":
        a = F.layer_norm(zf, (zf.shape[-1],), fold.weight.float(),
                         None if fold.bias is None else fold.bias.float(), fold.eps)
    else:
        a = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + fold.eps) * fold.weight.float()
    return z, a


def _rows(w, idx):
    return w if idx is None else w.index_select(0, idx.long())


def norm_rows_gemv_ref(weight, x, idx, fold: NormFold, residual=None, activation=None, count=None, *,
                       validate: bool = True, preload: bool = False):
    """Plain-PyTorch reference of :func:`norm_rows_gemv`: the norm computed explicitly in fp32, then the GEMV."""
    _check_activation(activation)
    z, a = _normed_ref(x, residual, fold)
    y = a @ _rows(weight, idx).float().T
    if fold.lin_bias is not None:
        y = y + _rows(fold.lin_bias, idx).float()
    if activation == "relu":
        y = torch.relu(y)
    return zero_past_count(y, count).to(weight.dtype), z


def norm_swiglu_gemv(gate, up, x, idx, fold: NormFold, residual=None, count=None, *, validate: bool = True,
                     preload: bool = False):
    """``(y, z)`` with ``y = silu(n @ gate[idx].T) * (n @ up[idx].T)``, ``n = rms_norm(z)``, ``z = x + residual``:
    a Llama MLP's selected neurons with the RMS norm before it folded in (``fold`` from ``fold_norm(gate, g,
    kind="rms")``; it holds no per-row values, so it serves ``up`` as well)."""
    _check(gate, x, idx, fold, residual, count, validate, preload, up=up)
    check_up(gate, up)
    return _run(gate, x, idx, fold, residual, count, False, preload, up=up)


def norm_swiglu_gemv_ref(gate, up, x, idx, fold: NormFold, residual=None, count=None, *, validate: bool = True,
                         preload: bool = False):
    """Plain-PyTorch reference of :func:`norm_swiglu_gemv`."""
    z, a = _normed_ref(x, residual, fold)
    y = F.silu(a @ _rows(gate, idx).float().T) * (a @ _rows(up, idx).float().T)
    return zero_past_count(y, count).to(gate.dtype), z
