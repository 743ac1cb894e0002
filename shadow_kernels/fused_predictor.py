"""Fused sparsity predictor: ``relu(x @ w1.T + b1) @ w2.T + b2`` for one token or a small batch.

Two launches of the gather-rows GEMV kernel with every row selected: the first fuses bias and
ReLU into its epilogue and keeps the hidden layer in fp32 on the device, the second reads it and
writes fp32 scores. A single launch would need every program to recompute the hidden layer (or a
grid-wide barrier), which costs more than the one extra launch inside a CUDA graph.
"""

from __future__ import annotations

import torch

from ._common import check_float
from .gather_cols import _launch_cols
from .gather_rows import launch_rows_gemv
from .topk import mask_to_indices

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def _check_predictor(x, w1, b1, w2, b2, w2_transposed=False):
    check_float("w1", w1, ndims=(2,), last_contiguous=True)
    dev = w1.device
    H, E = w1.shape
    check_float("x", x, ndims=(1, 2), dtype=w1.dtype, device=dev)
    if x.shape[-1] != E:
        raise ValueError(f"x has {x.shape[-1]} features but w1 is [{H}, {E}]; expected x [..., {E}]")
    if w2_transposed:
        check_float("w2t", w2, ndims=(2,), dtype=w1.dtype, device=dev, last_contiguous=True)
        if w2.shape[0] != H:
            raise ValueError(f"w2t is {list(w2.shape)} but the hidden layer has {H} units; expected w2t [{H}, O]")
        O = w2.shape[1]
    else:
        # fp8 w2 comes with w2_scale (fused_predictor checks that pair); otherwise w2 has w1's dtype
        check_float("w2", w2, ndims=(2,), dtype=FP8 if w2.dtype == FP8 else w1.dtype, device=dev,
                    last_contiguous=True)
        if w2.shape[1] != H:
            raise ValueError(f"w2 is {list(w2.shape)} but the hidden layer has {H} units; expected w2 [O, {H}]")
        O = w2.shape[0]
    for name, b, n in (("b1", b1, H), ("b2", b2, O)):
        if b is not None:
            check_float(name, b, ndims=(1,), dtype=w1.dtype, device=dev)
            if b.shape[0] != n:
                raise ValueError(f"{name} has {b.shape[0]} entries; expected {n}")


def quantize_rows_fp8(w: torch.Tensor, chunk_rows: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` float8 e4m3 [O, H] and ``scale`` fp32 [O], ``w ~= q * scale[:, None]``:
    one scale per row (per predictor output), the row's largest magnitude mapped to 448. For the large
    second layer of a predictor, whose outputs only have to rank units: it halves the bytes a per-token
    prediction reads (rank agreement: notes/quality.md). Works ``chunk_rows`` rows at a time, so the fp32
    copy it needs is a chunk, not the whole weight (OPT-30B's second layer is 5.5 GB in fp16)."""
    check_float("w", w, ndims=(2,))
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], chunk_rows):
        part = w[i: i + chunk_rows].float()
        s = part.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        scale[i: i + chunk_rows] = s
        q[i: i + chunk_rows] = (part / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def _check_w2_scale(w2, w2_scale):
    if w2.dtype == FP8:
        if not isinstance(w2_scale, torch.Tensor) or w2_scale.dtype != torch.float32 \
                or tuple(w2_scale.shape) != (w2.shape[0],):
            raise ValueError(f"w2 is float8_e4m3fn; w2_scale must be a float32 tensor [{w2.shape[0]}] (one per "
                             f"output), got {getattr(w2_scale, 'dtype', w2_scale)!r} "
                             f"{tuple(getattr(w2_scale, 'shape', ()))}")
        if w2_scale.device != w2.device:
            raise ValueError(f"w2_scale is on {w2_scale.device}, w2 on {w2.device}")
    elif w2_scale is not None:
        raise ValueError(f"w2_scale is only for float8_e4m3fn w2 (see quantize_rows_fp8); w2 is {w2.dtype}")


def fused_predictor(x, w1, b1, w2, b2, w2_scale=None):
    """Scores in float32: [E] -> [O] or [B, E] -> [B, O]. w1 [H, E], w2 [O, H]; biases may be None.
    w2 may be float8_e4m3fn with ``w2_scale`` fp32 [O] (:func:`quantize_rows_fp8`)."""
    _check_w2_scale(w2, w2_scale)
    _check_predictor(x, w1, b1, w2, b2)
    x2d = x if x.dim() == 2 else x[None]
    hidden = launch_rows_gemv(w1, x2d, None, b1, None, True, torch.float32)
    # preload: the kernel before this one wrote only `hidden`, so w2 streams in before it finishes
    scores = launch_rows_gemv(w2, hidden, None, b2, None, False, torch.float32, scale=w2_scale, preload=True)
    return scores.reshape(w2.shape[0]) if x.dim() == 1 else scores


def fused_predictor_ref(x, w1, b1, w2, b2, w2_scale=None):
    """Plain-PyTorch reference of :func:`fused_predictor` (fp32 throughout)."""
    _check_w2_scale(w2, w2_scale)
    h = x.float() @ w1.float().T
    if b1 is not None:
        h = h + b1.float()
    h = torch.relu(h)
    y = h @ w2.float().T
    if w2_scale is not None:
        y = y * w2_scale
    if b2 is not None:
        y = y + b2.float()
    return y


def sparse_hidden_predictor(x, w1, b1, w2t, b2, *, return_live=False):
    """:func:`fused_predictor` with the second weight stored transposed, ``w2t`` [H, O] (= w2.T), and
    read only where the hidden unit is live: after the ReLU a hidden unit that is zero for every row
    of the batch contributes nothing, so its row of ``w2t`` is skipped (a gather-columns GEMV over the
    live units). Exact, not an approximation; it pays when the second layer is large (ShadowLLM's
    E -> 2048 -> L_s (H + F) predictor is gigabytes) and about half the hidden units are zero.

    Returns fp32 scores like :func:`fused_predictor`; with ``return_live`` also the one-element int32
    device tensor counting the live hidden units.
    """
    _check_predictor(x, w1, b1, w2t, b2, w2_transposed=True)
    x2d = x if x.dim() == 2 else x[None]
    H = w1.shape[0]
    hidden = launch_rows_gemv(w1, x2d, None, b1, None, True, torch.float32)  # [B, H] fp32, ReLU applied
    live = (hidden != 0) if hidden.shape[0] == 1 else (hidden != 0).any(dim=0, keepdim=True)
    sel = mask_to_indices(live, H, validate=False)
    idx, count = sel.idx[0], sel.count
    scores = _launch_cols(w2t, hidden.index_select(1, idx), idx, b2, count, True, None, out_dtype=torch.float32)
    scores = scores.reshape(w2t.shape[1]) if x.dim() == 1 else scores
    return (scores, count) if return_live else scores


def sparse_hidden_predictor_ref(x, w1, b1, w2t, b2, *, return_live=False):
    """Plain-PyTorch reference of :func:`sparse_hidden_predictor`."""
    scores = fused_predictor_ref(x, w1, b1, w2t.T, b2)
    if not return_live:
        return scores
    h = torch.relu(x.float() @ w1.float().T + (b1.float() if b1 is not None else 0.0))
    live = (h != 0) if h.dim() == 1 else (h != 0).any(dim=0)
    return scores, live.sum().reshape(1).to(torch.int32)
