"""Fused sparsity predictor: ``relu(x @ w1.T + b1) @ w2.T + b2`` for one token or a small batch.

Two launches of the gather-rows GEMV kernel with every row selected: the first fuses bias and
ReLU into its epilogue and keeps the hidden layer in fp32 on the device, the second reads it and
writes fp32 scores. A single launch would need every program to recompute the hidden layer (or a
grid-wide barrier), which costs more than the one extra launch inside a CUDA graph.
"""

from __future__ import annotations

import torch

from ._common import check_float
from .gather_rows import launch_rows_gemv


def _check_predictor(x, w1, b1, w2, b2):
    check_float("w1", w1, ndims=(2,), last_contiguous=True)
    dev = w1.device
    H, E = w1.shape
    check_float("x", x, ndims=(1, 2), dtype=w1.dtype, device=dev)
    if x.shape[-1] != E:
        raise ValueError(f"x has {x.shape[-1]} features but w1 is [{H}, {E}]; expected x [..., {E}]")
    check_float("w2", w2, ndims=(2,), dtype=w1.dtype, device=dev, last_contiguous=True)
    if w2.shape[1] != H:
        raise ValueError(f"w2 is {list(w2.shape)} but the hidden layer has {H} units; expected w2 [O, {H}]")
    O = w2.shape[0]
    for name, b, n in (("b1", b1, H), ("b2", b2, O)):
        if b is not None:
            check_float(name, b, ndims=(1,), dtype=w1.dtype, device=dev)
            if b.shape[0] != n:
                raise ValueError(f"{name} has {b.shape[0]} entries; expected {n}")


def fused_predictor(x, w1, b1, w2, b2):
    """Scores in float32: [E] -> [O] or [B, E] -> [B, O]. w1 [H, E], w2 [O, H]; biases may be None."""
    _check_predictor(x, w1, b1, w2, b2)
    x2d = x if x.dim() == 2 else x[None]
    hidden = launch_rows_gemv(w1, x2d, None, b1, None, True, torch.float32)
    scores = launch_rows_gemv(w2, hidden, None, b2, None, False, torch.float32)
    return scores.reshape(w2.shape[0]) if x.dim() == 1 else scores


def fused_predictor_ref(x, w1, b1, w2, b2):
    """Plain-PyTorch reference of :func:`fused_predictor` (fp32 throughout)."""
    h = x.float() @ w1.float().T
    if b1 is not None:
        h = h + b1.float()
    h = torch.relu(h)
    y = h @ w2.float().T
    if b2 is not None:
        y = y + b2.float()
    return y
