"""The kernel backend a decoder runs on: the Triton kernels, or their plain-PyTorch references.

Both have the same signatures and the same effects, and both can be captured in a CUDA graph; the
references make CPU runs (tests, quality evaluation without a GPU) fast, and are a check on the
kernels. The decoder calls them with ``validate=False``: index lists come from our own top-k, and a
check would read values back to the host in the middle of a decode step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

import shadow_kernels as sk
from shadow_kernels.add_norm import add_layernorm, add_layernorm_ref, add_rmsnorm, add_rmsnorm_ref
from shadow_kernels.decode_attention import decode_attention, decode_attention_ref
from shadow_kernels.gqa_attention import gqa_decode_attention, gqa_decode_attention_ref

BACKENDS = ("triton", "torch")


@dataclass(frozen=True)
class Ops:
    name: str
    gather_rows: Callable
    gather_cols: Callable
    attention: Callable
    predictor: Callable
    topk: Callable
    mask_to_indices: Callable
    add_norm: Callable
    predictor_sparse: Callable
    add_rms: Callable
    gqa_attention: Callable
    swiglu: Callable
    gemv: Callable | None = None  # dense ``act(x @ w.T + b)``: the decoders' dense path with dense_gemv="triton"
    gather_segments: Callable | None = None  # out_proj over the selected heads
    norm_gemv: Callable | None = None  # (act(norm(x + r) @ w[idx].T + b), x + r): qkv and fc1 of a pre-norm layer
    norm_swiglu: Callable | None = None  # the same for a Llama MLP's selected SwiGLU neurons (RMS norm)
    greedy: Callable | None = None  # (logits, tok, pos): the next token into tok, pos + 1 (generation's step end)
    embed: Callable | None = None  # (tokens, table, pos, pos_table, offset): OPT's decode input in one launch
    threshold_cols: Callable | None = None  # (weight_t, a, threshold, bias) -> (y, count): the threshold mode's GEMV
    # (weight_t, x, residual, norm_weight, eps, threshold) -> (y, count, x + residual): Llama's add and RMS norm first
    add_rms_threshold_cols: Callable | None = None
    # (idx, count, HeadPlanBuffers, n_heads=, head_dim=, n_kv_heads=, kv_always=): the plan buffers of the selected
    # heads (models.plan)
    head_plan: Callable | None = None


def _gemv_triton(weight, x, bias=None, relu=False):
    """Every row of ``weight``: the gather-rows kernel without an index list (preload: weights only)."""
    from shadow_kernels.gather_rows import launch_rows_gemv

    y = launch_rows_gemv(weight, x if x.dim() == 2 else x[None], None, bias, None, relu, weight.dtype, preload=True)
    return y if x.dim() == 2 else y[0]


def _gemv_torch(weight, x, bias=None, relu=False):
    y = F.linear(x, weight, bias)
    return torch.relu(y) if relu else y


# The decoder's GEMVs preload (shadow_kernels.gather_rows_gemv): with programmatic dependent launch
# they read their index list, count and first weights before the kernel just before them finishes. That
# kernel is a norm, an attention or the GEMV before (fc1 before fc2; out_proj before the fc1 that folds the
# norm in; the last layer's fc2 before qkv), which writes none of those: plan
# buffers are filled by the predictor modes' top-k and index arithmetic, several launches earlier, and the
# last of those launches is a PyTorch kernel that starts only when the launches before it have finished.
# OPT's decode attention preloads too: its producer, the Q/K/V GEMV, writes neither the KV cache, its
# valid flags, the position nor the head slots.
TRITON = Ops("triton", partial(sk.gather_rows_gemv, preload=True), partial(sk.gather_cols_gemv, preload=True),
             partial(decode_attention, preload=True), sk.fused_predictor,
             sk.topk_indices, sk.mask_to_indices, add_layernorm, sk.sparse_hidden_predictor,
             add_rmsnorm, gqa_decode_attention, sk.gather_swiglu_gemv, _gemv_triton,
             partial(sk.gather_segments_gemv, preload=True), partial(sk.norm_rows_gemv, preload=True),
             sk.norm_swiglu_gemv, sk.greedy_next, sk.embed_add, sk.threshold_cols_gemv, sk.add_rms_threshold_cols_gemv,
             sk.head_plan)
TORCH = Ops("torch", sk.gather_rows_gemv_ref, sk.gather_cols_gemv_ref, decode_attention_ref, sk.fused_predictor_ref,
            sk.topk_indices_ref, sk.mask_to_indices_ref, add_layernorm_ref,
            sk.sparse_hidden_predictor_ref, add_rmsnorm_ref, gqa_decode_attention_ref, sk.gather_swiglu_gemv_ref,
            _gemv_torch, sk.gather_segments_gemv_ref, sk.norm_rows_gemv_ref, sk.norm_swiglu_gemv_ref,
            sk.greedy_next_ref, sk.embed_add_ref, sk.threshold_cols_gemv_ref, sk.add_rms_threshold_cols_gemv_ref,
            sk.head_plan_ref)


def unfused_norms(ops: Ops) -> Ops:
    """``ops`` with the norm GEMV split back into two kernels, ``ops.add_norm`` and then the GEMV: what a
    pre-norm decode step runs without the fold. For measuring the fold against it in one run."""

    def add_norm(x, residual, fold):
        if fold.kind == "rms":
            return ops.add_rms(x, residual, fold.weight, fold.eps)
        return ops.add_norm(x, residual, fold.weight, fold.bias, fold.eps)

    def norm_gemv(w, x, idx, fold, residual=None, activation=None, count=None, *, validate=True, preload=False):
        z, a = add_norm(x, residual, fold)
        if idx is None:
            return ops.gemv(w, a, fold.lin_bias, relu=activation == "relu"), z
        return ops.gather_rows(w, a, idx, fold.lin_bias, activation, count=count, validate=validate), z

    def norm_swiglu(gate, up, x, idx, fold, residual=None, count=None, *, validate=True, preload=False):
        z, a = add_norm(x, residual, fold)
        return ops.swiglu(gate, up, a, idx, count=count, validate=validate), z

    return replace(ops, name=f"{ops.name}-unfused-norms", norm_gemv=norm_gemv, norm_swiglu=norm_swiglu)


def get_ops(backend: str | Ops | None, device: torch.device) -> Ops:
    """``None`` picks Triton on CUDA and the references elsewhere."""
    if isinstance(backend, Ops):
        return backend
    if backend is None:
        return TRITON if torch.device(device).type == "cuda" else TORCH
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return TRITON if backend == "triton" else TORCH
