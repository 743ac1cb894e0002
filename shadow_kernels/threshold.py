"""Input sparsity by magnitude: ``y = (a * [|a| > t]) @ weight_t + bias``, reading only the rows of ``weight_t`` whose
input entry is kept (the threshold mode's projections, TEAL's idea).

``weight_t`` is W transposed ([K, M]: K inputs, M outputs), so the weights of one input are one contiguous row. A
batch keeps the union of its rows' entries (the GEMV takes one index list). Two launches: one program compacts the
kept entries (a compare against the threshold, a running prefix sum for each kept input's slot) into an index
list, a count and the kept values; then the gather-columns GEMV reads those rows. Done with PyTorch ops, the
selection takes five launches before the GEMV (abs, compare, any, the index list, a gather of the kept values), and
a decode step runs four such projections per layer. The select kernel can also make its input first: Llama's residual
add and RMS norm (:func:`add_rms_threshold_cols_gemv`) or SwiGLU's ``silu(gate) * up`` (``swiglu=True``).

The GEMV is launched without preloading its index list (``preload=False``): under programmatic dependent launch a
preloading GEMV reads its index list before the kernel just before it finishes, and here that kernel writes it.

One token (batch 1) takes a fused path instead (:func:`set_fused`, on by default; ``SHADOWBENCH_THRESHOLD_FUSED=0``
turns it off): every program of the GEMV makes its own chunk of the input (the prologue, the add-and-norm's sum of
squares over the whole row included), compares it against the threshold and loads only the weight rows of the kept
entries (a masked-off row is never fetched), with no index list. The select kernel is one program walking the whole
input with a running prefix sum, a serial step of a few microseconds before each projection; the fused path removes
it. The split reduction's second kernel also adds the chunks' counts of kept inputs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_device, check_float, next_pow2, set_switch
from .add_norm import add_rmsnorm, add_rmsnorm_ref
from .gather_cols import choose_split, gather_cols_gemv, gather_cols_gemv_ref
from .pdl import pdl_kwargs, pdl_sync
from .topk import mask_to_indices_ref

# What the select kernel reads before it thresholds: the projection's input itself; SwiGLU's silu(gate) * up from the
# [B, 2K] output of the gate-and-up projection; or Llama's residual add and RMS norm of [B, K] x and residual (the
# sum is written out too, it is the next residual).
PLAIN, SWIGLU, ADD_RMS = 0, 1, 2
# the add-and-norm prologue holds each row's norm in registers: batches up to this many rows
ADD_RMS_MAX_BATCH = 16


@triton.jit
def _input_block(a_ptr, r_ptr, w_ptr, rows, cols, m, stride_ab, stride_rb, K, rstd,
                 PROLOGUE: tl.constexpr, OUT: tl.constexpr):
    # the projection's input at [rows, cols], in the input dtype, rounded where the composed PyTorch ops round
    if PROLOGUE == 1:
        g = tl.load(a_ptr + rows[:, None] * stride_ab + cols[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(a_ptr + rows[:, None] * stride_ab + K + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sg = (g * tl.sigmoid(g)).to(OUT).to(tl.float32)
        return (sg * u).to(OUT)
    elif PROLOGUE == 2:
        x = tl.load(a_ptr + rows[:, None] * stride_ab + cols[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows[:, None] * stride_rb + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sf = (x + r).to(OUT).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        return ((sf * rstd[:, None]).to(OUT).to(tl.float32) * w[None, :]).to(OUT)
    else:
        return tl.load(a_ptr + rows[:, None] * stride_ab + cols[None, :], mask=m, other=0.0)


@triton.jit
def _threshold_select_kernel(a_ptr, r_ptr, w_ptr, s_ptr, t_ptr, h_ptr, idx_ptr, count_ptr, B, K, eps,
                             stride_ab, stride_rb, stride_sb, stride_hb,
                             PROLOGUE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    # One program: each block of inputs is kept where any batch row's magnitude exceeds the threshold; a running
    # prefix sum gives each kept input its slot, so the index list comes out sorted. Slots past the count are zeroed
    # (index 0, value 0), as the index lists of the other kernels are padded. With the add-and-norm prologue the
    # batch is one block of rows (the launcher's limit), whose norms a first pass computes.
    OUT: tl.constexpr = h_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    offs_b = tl.arange(0, BLOCK_B)
    t = tl.load(t_ptr)
    total = tl.program_id(0) * 0
    rstd = tl.zeros([BLOCK_B], dtype=tl.float32)
    if PROLOGUE == 2:
        ss = tl.zeros([BLOCK_B], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + offs
            m = (offs_b[:, None] < B) & (cols < K)[None, :]
            x = tl.load(a_ptr + offs_b[:, None] * stride_ab + cols[None, :], mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + offs_b[:, None] * stride_rb + cols[None, :], mask=m, other=0.0).to(tl.float32)
            sv = (x + r).to(OUT)
            tl.store(s_ptr + offs_b[:, None] * stride_sb + cols[None, :], sv, mask=m)
            sf = sv.to(tl.float32)
            ss += tl.sum(sf * sf, axis=1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    for start in range(0, K, BLOCK):
        cols = start + offs
        ok = cols < K
        keep = tl.zeros([BLOCK], dtype=tl.int32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            m = (rows[:, None] < B) & ok[None, :]
            x = _input_block(a_ptr, r_ptr, w_ptr, rows, cols, m, stride_ab, stride_rb, K, rstd, PROLOGUE, OUT)
            keep = keep | tl.max(((tl.abs(x) > t) & m).to(tl.int32), axis=0)
        slot = total + tl.cumsum(keep, axis=0) - 1
        live = keep != 0
        tl.store(idx_ptr + slot, cols.to(tl.int32), mask=live)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            m = (rows[:, None] < B) & ok[None, :]
            x = _input_block(a_ptr, r_ptr, w_ptr, rows, cols, m, stride_ab, stride_rb, K, rstd, PROLOGUE, OUT)
            tl.store(h_ptr + rows[:, None] * stride_hb + slot[None, :], x, mask=m & live[None, :])
        total += tl.sum(keep, axis=0)
    for start in range(0, K, BLOCK):
        slots = start + offs
        pad = (slots >= total) & (slots < K)
        tl.store(idx_ptr + slots, tl.zeros([BLOCK], dtype=tl.int32), mask=pad)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            tl.store(h_ptr + rows[:, None] * stride_hb + slots[None, :], tl.zeros([BLOCK_B, BLOCK], dtype=tl.float32)
                     .to(OUT), mask=(rows[:, None] < B) & pad[None, :])
    tl.store(count_ptr, total)


@triton.jit
def _fused_kernel(a_ptr, r_ptr, w_ptr, s_ptr, t_ptr, wt_ptr, bias_ptr, out_ptr, cnt_ptr, K, M, eps, stride_wk,
                  stride_os, CHUNK, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                  USE_PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # One token. A program owns BLOCK_M outputs and the inputs [pid_s * CHUNK, + CHUNK): it makes them (prologue),
    # keeps those above the threshold and reads only their weight rows. The programs of the first output block write
    # their chunk's count of kept inputs (and, with the add-and-norm prologue, the chunk's residual sum).
    # MODE 0: one chunk, the output and the count written directly; 1: fp32 partials and per-chunk counts, summed by
    # _fused_reduce_kernel.
    if USE_PDL:
        pdl_sync()
    OUT: tl.constexpr = wt_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = tl.arange(0, 1)
    offs_k = tl.arange(0, BLOCK_K)
    rstd = tl.zeros([1], dtype=tl.float32)
    if PROLOGUE == 2:  # every program needs the row's norm: the sum of squares of the whole row, in fp32
        ss = tl.zeros([1], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + offs_k
            m = (rows[:, None] < 1) & (cols < K)[None, :]
            x = tl.load(a_ptr + cols[None, :], mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + cols[None, :], mask=m, other=0.0).to(tl.float32)
            sf = (x + r).to(OUT).to(tl.float32)
            ss += tl.sum(sf * sf, axis=1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    t = tl.load(t_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    k_lo = pid_s * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
    kept = tl.zeros([BLOCK_K], dtype=tl.int32)
    for start in range(k_lo, k_hi, BLOCK_K):
        cols = start + offs_k
        m = (rows[:, None] < 1) & (cols < k_hi)[None, :]
        x = _input_block(a_ptr, r_ptr, w_ptr, rows, cols, m, 0, 0, K, rstd, PROLOGUE, OUT)  # [1, BLOCK_K]
        keep = (tl.abs(x) > t) & m
        if PROLOGUE == 2:
            sv = (tl.load(a_ptr + cols[None, :], mask=m, other=0.0).to(tl.float32)
                  + tl.load(r_ptr + cols[None, :], mask=m, other=0.0).to(tl.float32)).to(OUT)
            tl.store(s_ptr + cols[None, :], sv, mask=m & ((rows + pid_m) == 0)[:, None])  # a tensor mask (interpreter)
        keep1 = tl.max(keep.to(tl.int32), axis=0)  # [BLOCK_K]
        w = tl.load(wt_ptr + cols.to(tl.int64)[:, None] * stride_wk + offs_m[None, :],
                    mask=(keep1 != 0)[:, None] & m_ok[None, :], other=0.0)
        h = tl.sum(tl.where(keep, x, 0.0).to(tl.float32), axis=0)  # [BLOCK_K]
        acc += w.to(tl.float32) * h[:, None]
        kept += keep1
    out = tl.sum(acc, axis=0)
    n_kept = tl.sum(kept, axis=0)
    if MODE == 0:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_m, out.to(OUT), mask=m_ok)
    else:
        tl.store(out_ptr + pid_s * stride_os + offs_m, out, mask=m_ok)
    if pid_m == 0:
        tl.store(cnt_ptr + pid_s, n_kept)


@triton.jit
def _fused_reduce_kernel(part_ptr, cnt_part_ptr, cnt_ptr, bias_ptr, y_ptr, M, SPLIT, HAS_BIAS: tl.constexpr,
                         USE_PDL: tl.constexpr, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr):
    # the fused path's partials summed in chunk order (bit-identical from run to run), plus the bias; program 0 also
    # sums the chunks' counts
    if USE_PDL:
        pdl_sync()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, SPLIT):
        acc += tl.load(part_ptr + c * M + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)
    if tl.program_id(0) == 0:
        parts = tl.arange(0, SPLIT_P2)
        tl.store(cnt_ptr, tl.sum(tl.load(cnt_part_ptr + parts, mask=parts < SPLIT, other=0), axis=0))


_FUSED = {"on": os.environ.get("SHADOWBENCH_THRESHOLD_FUSED", "1") != "0"}
_FUSED_BLOCK_K = 32


def set_fused(on: bool) -> bool:
    """Turn the one-token fused path (module docstring) on or off for later calls; returns the previous setting."""
    return set_switch(_FUSED, on, "set_fused")


def _fused(weight_t, a, threshold, bias, prologue=PLAIN, residual=None, norm_weight=None, eps=0.0, split=None,
           block_m=None):
    """The fused path for one token ``a`` [1, K] (or [1, 2K] gate and up): ``(y [1, M], count int32 [1], s)``.
    ``split`` and ``block_m`` override the chunk count and the outputs per program (for timing them)."""
    K, M = weight_t.shape
    dev = weight_t.device
    y = torch.empty((1, M), dtype=weight_t.dtype, device=dev)
    count = torch.empty((1,), dtype=torch.int32, device=dev)
    s = torch.empty_like(a) if prologue == ADD_RMS else None
    a = a.contiguous()
    r = a if residual is None else residual.contiguous()
    w = a if norm_weight is None else norm_weight
    t = threshold.reshape(1).to(a.dtype)
    block_m = block_m or (128 if M >= 512 else 64)
    # split as gather-cols splits its rows: about four programs per SM over the output blocks, each chunk at least
    # 64 inputs (two loop iterations of the fused kernel)
    n_split = split or choose_split(K, M, block_m, dev)
    chunk = triton.cdiv(triton.cdiv(K, n_split), _FUSED_BLOCK_K) * _FUSED_BLOCK_K
    n_split = triton.cdiv(K, chunk)
    bias_arg = bias if bias is not None else weight_t
    if n_split == 1:
        mode, out, cnt = 0, y, count
    else:
        mode = 1
        out = torch.empty((n_split, M), dtype=torch.float32, device=dev)
        cnt = torch.empty((n_split,), dtype=torch.int32, device=dev)
    _fused_kernel[(triton.cdiv(M, block_m), n_split)](
        a, r, w, a if s is None else s, t, weight_t, bias_arg, out, cnt, K, M, float(eps), weight_t.stride(0), M,
        chunk, PROLOGUE=prologue, HAS_BIAS=bias is not None, MODE=mode, BLOCK_M=block_m, BLOCK_K=_FUSED_BLOCK_K,
        num_warps=4, **pdl_kwargs(dev))
    if mode == 1:
        _fused_reduce_kernel[(triton.cdiv(M, 256),)](out, cnt, count, bias_arg, y, M, n_split,
                                                    HAS_BIAS=bias is not None, BLOCK=256,
                                                    SPLIT_P2=next_pow2(n_split), **pdl_kwargs(dev))
    return y, count, s


def _use_fused(a2, weight_t) -> bool:
    return _FUSED["on"] and a2.shape[0] == 1 and weight_t.shape[0] > 0 and weight_t.shape[1] > 0


def _check(weight_t, a, threshold, bias, any_device, swiglu=False):
    check_float("weight_t", weight_t, ndims=(2,), last_contiguous=True, any_device=any_device)
    check_float("a", a, ndims=(1, 2), dtype=weight_t.dtype, device=weight_t.device, any_device=any_device)
    K = weight_t.shape[0]
    if a.shape[-1] != (2 * K if swiglu else K):
        what = f"{2 * K} (gate and up, {K} each)" if swiglu else str(K)
        raise ValueError(f"a has {a.shape[-1]} entries but weight_t has {K} rows (one per input): expected {what}")
    if not isinstance(threshold, torch.Tensor) or threshold.numel() != 1:
        got = tuple(threshold.shape) if isinstance(threshold, torch.Tensor) else type(threshold).__name__
        raise TypeError(f"threshold must be a one-element tensor (on the device, so a step stays capturable), got "
                        f"{got}")
    check_device("threshold", threshold, weight_t.device, any_device)
    if bias is not None:
        check_float("bias", bias, ndims=(1,), dtype=weight_t.dtype, device=weight_t.device, any_device=any_device)
        if bias.shape[0] != weight_t.shape[1]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight_t has {weight_t.shape[1]} outputs")


def _select(a, threshold, prologue=PLAIN, residual=None, norm_weight=None, eps=0.0):
    """One launch of the select kernel: ``(h, idx, count, s)``, ``s`` the residual sum (ADD_RMS) or None."""
    B = a.shape[0]
    K = a.shape[1] // 2 if prologue == SWIGLU else a.shape[1]
    h = torch.empty((B, K), dtype=a.dtype, device=a.device)
    idx = torch.empty((K,), dtype=torch.int32, device=a.device)
    count = torch.empty((1,), dtype=torch.int32, device=a.device)
    s = torch.empty_like(a) if prologue == ADD_RMS else None
    if B == 0 or K == 0:
        idx.zero_()
        count.zero_()
        return h.zero_(), idx, count, s
    a = a.contiguous()
    r = a if residual is None else residual.contiguous()
    w = a if norm_weight is None else norm_weight
    t = threshold.reshape(1).to(a.dtype)
    block_b = next_pow2(B) if prologue == ADD_RMS else min(next_pow2(B), 8)
    _threshold_select_kernel[(1,)](a, r, w, a if s is None else s, t, h, idx, count, B, K, float(eps), a.stride(0),
                                   r.stride(0), 0 if s is None else s.stride(0), h.stride(0), PROLOGUE=prologue,
                                   BLOCK_B=block_b, BLOCK=1024)
    return h, idx, count, s


def threshold_select(a: torch.Tensor, threshold: torch.Tensor, *, swiglu: bool = False):
    """The inputs of ``a`` [B, K] kept by ``|a| > threshold`` in any row, as ``(h [B, K], idx int32 [K],
    count int32 [1])``: the kept values in slots ``0 .. count - 1`` of ``h`` and their input numbers, ascending, in
    ``idx`` (both zero past the count). ``swiglu``: ``a`` is [B, 2K], gate then up, and the inputs are
    ``silu(gate) * up``. One Triton launch."""
    return _select(a, threshold, SWIGLU if swiglu else PLAIN)[:3]


def threshold_cols_gemv(weight_t, a, threshold, bias=None, *, swiglu=False, validate=True):
    """``(a * [|a| > threshold]) @ weight_t + bias`` reading only the kept inputs' rows of ``weight_t`` [K, M];
    ``a`` [K] or [B, K] in the weight's dtype (a batch keeps the union of its rows' inputs); ``threshold``: a
    one-element tensor on the device (an exact zero input is always dropped). ``swiglu``: ``a`` is the gate-and-up
    projection's output [.., 2K] and the input is ``silu(gate) * up``, made in the select kernel (Llama's down
    projection). Returns ``(y, count)``: y [M] or [B, M] in the weight dtype (fp32 accumulation), count the kept
    inputs (int32 [1], on the device)."""
    if validate:
        _check(weight_t, a, threshold, bias, any_device=False, swiglu=swiglu)
    a2 = a if a.dim() == 2 else a[None]
    if _use_fused(a2, weight_t):
        y, count, _ = _fused(weight_t, a2, threshold, bias, SWIGLU if swiglu else PLAIN)
    else:
        h, idx, count, _ = _select(a2, threshold, SWIGLU if swiglu else PLAIN)
        y = gather_cols_gemv(weight_t, h, idx, bias, count, validate=False)
    return (y if a.dim() == 2 else y[0]), count


def threshold_cols_gemv_ref(weight_t, a, threshold, bias=None, *, swiglu=False, validate=True):
    """Plain-PyTorch reference of :func:`threshold_cols_gemv` (same signature and results; capturable)."""
    if validate:
        _check(weight_t, a, threshold, bias, any_device=True, swiglu=swiglu)
    a2 = a if a.dim() == 2 else a[None]
    if swiglu:
        gate, up = a2.chunk(2, dim=-1)
        a2 = F.silu(gate) * up
    keep = (a2.abs() > threshold.to(a2.dtype)).any(dim=0, keepdim=True)  # [1, K]
    sel = mask_to_indices_ref(keep, weight_t.shape[0], validate=False)
    idx = sel.idx[0]
    y = gather_cols_gemv_ref(weight_t, a2.index_select(1, idx.long()), idx, bias, count=sel.count, validate=False)
    return (y if a.dim() == 2 else y[0]), sel.count


def _check_norm(x, residual, norm_weight):
    if x.dim() != 2 or residual.shape != x.shape or norm_weight.shape != x.shape[1:]:
        raise ValueError(f"x and residual must be [B, K] and norm_weight [K], got {tuple(x.shape)}, "
                         f"{tuple(residual.shape)} and {tuple(norm_weight.shape)}")


def add_rms_threshold_cols_gemv(weight_t, x, residual, norm_weight, eps, threshold, bias=None, *, validate=True):
    """Llama's residual add and RMS norm, then :func:`threshold_cols_gemv` of the normalised input: ``(y, count,
    s)`` with ``s = x + residual`` (the next residual). Up to ``ADD_RMS_MAX_BATCH`` rows the add, the norm and the
    selection are one launch before the GEMV; larger batches run :func:`shadow_kernels.add_rmsnorm` first."""
    if validate:
        _check_norm(x, residual, norm_weight)
        _check(weight_t, x, threshold, bias, any_device=False)
    if x.shape[0] > ADD_RMS_MAX_BATCH:
        s, a = add_rmsnorm(x, residual, norm_weight, eps)
        return (*threshold_cols_gemv(weight_t, a, threshold, bias, validate=False), s)
    if _use_fused(x, weight_t):
        return _fused(weight_t, x, threshold, bias, ADD_RMS, residual, norm_weight, eps)
    h, idx, count, s = _select(x, threshold, ADD_RMS, residual, norm_weight, eps)
    return gather_cols_gemv(weight_t, h, idx, bias, count, validate=False), count, s


def add_rms_threshold_cols_gemv_ref(weight_t, x, residual, norm_weight, eps, threshold, bias=None, *,
                                    validate=True):
    """Plain-PyTorch reference of :func:`add_rms_threshold_cols_gemv`."""
    if validate:
        _check_norm(x, residual, norm_weight)
        _check(weight_t, x, threshold, bias, any_device=True)
    s, a = add_rmsnorm_ref(x, residual, norm_weight, eps)
    return (*threshold_cols_gemv_ref(weight_t, a, threshold, bias, validate=False), s)
