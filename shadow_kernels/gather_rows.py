"""Gather-rows GEMV: ``y[..., j] = act(x @ weight[idx[j]] + bias[idx[j]])``, and its SwiGLU form
``y[..., j] = silu(x @ gate[idx[j]]) * (x @ up[idx[j]])`` (one Llama neuron = a row of gate and of up).

Used for fc1 (selected neurons) and for the Q/K/V rows of the selected heads: every selected
output row of ``weight`` is one contiguous row in memory, so a program streams ``BLOCK_N`` whole
rows and the kernel reads exactly the bytes of the selected rows once.

Padded index lists (see ``shadow_kernels.topk``): with ``count`` given, only ``idx[:count]`` is
used and the output slots ``count..k-1`` are zero, so the output shape never depends on data and
a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    autotune_bench,
    check_count,
    check_flag,
    check_float,
    check_indices,
    configs_for_platform,
    dot_acc,
    gemv_kernel_for,
    next_pow2,
    zero_past_count,
)
from .pdl import pdl_kwargs, pdl_sync
from .tuned import pinned_prune

_ACTIVATIONS = (None, "relu")


@triton.jit
def _norm_pivot(x_ptr, r_ptr, z_ptr, offs_b, b_ok, stride_xb, stride_rb, HAS_RES: tl.constexpr, NORM: tl.constexpr):
    """[BLOCK_B] fp32: each batch row's first z (LayerNorm), 0 otherwise. The loop works on ``d = z - pivot``
    (the weights multiply ``d * g``; the statistics sum d and d * d), so neither the variance
    ``E[d^2] - E[d]^2`` nor ``acc - (mean - pivot) * rowsum`` cancels when the mean is large against the spread."""
    p = tl.zeros(offs_b.shape, dtype=tl.float32)
    if NORM == 1:
        p = tl.load(x_ptr + offs_b * stride_xb, mask=b_ok, other=0.0).to(tl.float32)
        if HAS_RES:
            p = p + tl.load(r_ptr + offs_b * stride_rb, mask=b_ok, other=0.0).to(tl.float32)
            p = p.to(z_ptr.dtype.element_ty).to(tl.float32)
    return p


@triton.jit
def _norm_input(x, r, g, z_ptrs, mask, z_mask, pivot, HAS_RES: tl.constexpr, NORM: tl.constexpr):
    """One tile of a norm-fused GEMV's input (see shadow_kernels.norm_gemv), from the loaded tiles of x, the
    residual r and the norm weight g: ``z = x + r`` rounded to the stream's dtype (stored where ``z_mask``: one
    program writes it) and ``d = z - pivot`` (0 where masked). Returns ``(d * g, d)`` in fp32: what the weights
    multiply, and what the statistics sum."""
    z = x.to(tl.float32)
    if HAS_RES:
        z = z + r.to(tl.float32)
        z16 = z.to(z_ptrs.dtype.element_ty)
        tl.store(z_ptrs, z16, mask=z_mask)
        z = z16.to(tl.float32)
    d = tl.where(mask, z - pivot, 0.0)
    xin = d
    if NORM != 0:
        xin = d * g.to(tl.float32)
    return xin, d


@triton.jit
def _norm_tiles(x, r_ptrs, g_ptrs, mask, HAS_RES: tl.constexpr, NORM: tl.constexpr):
    """The residual and norm-weight tiles beside an input tile ``x`` (``x`` itself where there is none)."""
    r = x
    g = x
    if HAS_RES:
        r = tl.load(r_ptrs, mask=mask, other=0.0)
    if NORM != 0:
        g = tl.load(g_ptrs, mask=mask, other=0.0)
    return r, g


@triton.jit
def _rows_gemv_kernel(
    w_ptr, u_ptr, x_ptr, idx_ptr, bias_ptr, count_ptr, y_ptr, scale_ptr,
    r_ptr, g_ptr, rs_ptr, z_ptr,
    B, K, n_rows, eps,
    stride_wn, stride_xb, stride_yb, stride_rb, stride_zb,
    ROWS_BUCKET,  # only an autotune key: the power of two above n_rows (n_rows itself for a dense norm, see launcher)
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COUNT: tl.constexpr, RELU: tl.constexpr, GATED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_IEEE: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr = 0,
    PRELOAD: tl.constexpr = False, NORM: tl.constexpr = 0, HAS_RES: tl.constexpr = False,
):
    # NORM (shadow_kernels.norm_gemv): 0 none; 1 layer norm, 2 RMS norm of z = x (+ r), folded in. The loop
    # multiplies the weights by d * g with d = z - pivot (pivot: the row's first z for LN, else 0) and sums d
    # and d * d; the epilogue applies the statistics: LN (acc - (mean - pivot) * rowsum(W * g)) * rstd, RMS
    # acc * rstd; the fold's shift W @ beta + bias comes in as the bias.
    # A program owns BLOCK_N output rows (gathered weight rows) for BLOCK_B batch rows and walks
    # the whole reduction dimension K; no split-K, so every weight byte is read exactly once.
    if USE_PDL and not PRELOAD:
        # Programmatic dependent launch (see shadow_kernels.pdl): wait for the previous kernel's writes,
        # then let the next kernel's programs be scheduled while this one streams its weights.
        pdl_sync()
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    limit = n_rows
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), n_rows)
    live = rows < limit
    if HAS_IDX:
        src = tl.load(idx_ptr + rows, mask=live, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    w_rows = w_ptr + src[:, None] * stride_wn
    u_rows = u_ptr + src[:, None] * stride_wn  # GATED: the up rows beside the gate rows in w
    offs_k = tl.arange(0, BLOCK_K)
    # Programs whose rows all lie past the device-side count skip the loop and only write zeros (the
    # first, which writes the norm's input z = x + r, always walks it).
    k_end = tl.where((pid_n * BLOCK_N < limit) | (HAS_RES & (pid_n == 0)), K, 0)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    z_first = (tl.zeros([BLOCK_B], tl.int32) + pid_n) == 0  # a mask of tensors (the interpreter's need)
    s1 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)  # the norm's sums of d = z - pivot and d * d
    s2 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)

    if BLOCK_B == 1 and PREFETCH:
        # The next piece of the rows is loaded before this piece's products are summed, so two
        # pieces are in flight while the program waits (Triton pipelines only loads that feed tl.dot).
        # GATED: the up rows likewise.
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        x_row = x_ptr + pid_b * stride_xb
        k_ok = offs_k < k_end
        w = tl.load(w_rows + offs_k[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
        u = w
        if GATED:
            u = tl.load(u_rows + offs_k[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
        if USE_PDL and PRELOAD:  # index list, count and first weights read before the wait (see launcher)
            pdl_sync()
        piv = _norm_pivot(x_ptr, r_ptr, z_ptr, offs_b, b_ok, stride_xb, stride_rb, HAS_RES, NORM)
        x = tl.load(x_row + offs_k, mask=k_ok, other=0.0)
        r_row = r_ptr + pid_b * stride_rb
        r, g = _norm_tiles(x, r_row + offs_k, g_ptr + offs_k, k_ok, HAS_RES, NORM)
        for k0 in range(0, k_end, BLOCK_K):
            kn = k0 + BLOCK_K + offs_k
            kn_ok = kn < k_end
            w_next = tl.load(w_rows + kn[None, :], mask=live[:, None] & kn_ok[None, :], other=0.0)
            u_next = w_next
            if GATED:
                u_next = tl.load(u_rows + kn[None, :], mask=live[:, None] & kn_ok[None, :], other=0.0)
            x_next = tl.load(x_row + kn, mask=kn_ok, other=0.0)
            if NORM != 0 or HAS_RES:
                # the residual and norm-weight tiles are prefetched with x (an L2 round trip each otherwise)
                r_next, g_next = _norm_tiles(x_next, r_row + kn, g_ptr + kn, kn_ok, HAS_RES, NORM)
                kk = k0 + offs_k
                k_in = kk < k_end
                xin, d = _norm_input(x, r, g, z_ptr + pid_b * stride_zb + kk, k_in, k_in & z_first, piv, HAS_RES,
                                     NORM)
                s1 += d[None, :]
                s2 += (d * d)[None, :]
                r = r_next
                g = g_next
            else:
                xin = x.to(tl.float32)
            acc += w.to(tl.float32) * xin[None, :]
            if GATED:
                acc_u += u.to(tl.float32) * xin[None, :]
            w = w_next
            u = u_next
            x = x_next
        out = tl.sum(acc, axis=1)[None, :]
        out_u = tl.sum(acc_u, axis=1)[None, :]
    elif BLOCK_B == 1:
        # One token: elementwise products accumulated in fp32, one reduction at the end. The
        # upcast right after each load is also what the interpreter needs for bf16.
        if USE_PDL and PRELOAD:
            pdl_sync()
        piv = _norm_pivot(x_ptr, r_ptr, z_ptr, offs_b, b_ok, stride_xb, stride_rb, HAS_RES, NORM)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        x_row = x_ptr + pid_b * stride_xb
        for k0 in range(0, k_end, BLOCK_K):
            kk = k0 + offs_k
            if EVEN_K:
                w_mask = live[:, None]
                x = tl.load(x_row + kk).to(tl.float32)
            else:
                k_ok = kk < K
                w_mask = live[:, None] & k_ok[None, :]
                x = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=w_mask, other=0.0).to(tl.float32)
            if NORM != 0 or HAS_RES:
                k_in = kk < K
                r, g = _norm_tiles(x, r_ptr + pid_b * stride_rb + kk, g_ptr + kk, k_in, HAS_RES, NORM)
                x, d = _norm_input(x, r, g, z_ptr + pid_b * stride_zb + kk, k_in, k_in & z_first, piv, HAS_RES, NORM)
                s1 += d[None, :]
                s2 += (d * d)[None, :]
            acc += w * x[None, :]
            if GATED:
                u = tl.load(u_rows + kk[None, :], mask=w_mask, other=0.0).to(tl.float32)
                acc_u += u * x[None, :]
        out = tl.sum(acc, axis=1)[None, :]
        out_u = tl.sum(acc_u, axis=1)[None, :]
    else:
        # A small batch: tensor-core dot of [BLOCK_B, BLOCK_K] x [BLOCK_K, BLOCK_N], fp32 accumulate.
        if USE_PDL and PRELOAD:
            pdl_sync()
        piv = _norm_pivot(x_ptr, r_ptr, z_ptr, offs_b, b_ok, stride_xb, stride_rb, HAS_RES, NORM)
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            w = tl.load(w_rows + kk[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + offs_b[:, None] * stride_xb + kk[None, :], mask=b_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if NORM != 0 or HAS_RES:
                bk_ok = b_ok[:, None] & k_ok[None, :]
                r, g = _norm_tiles(x, r_ptr + offs_b[:, None] * stride_rb + kk[None, :], g_ptr + kk[None, :], bk_ok,
                                   HAS_RES, NORM)
                xin, d = _norm_input(x, r, g, z_ptr + offs_b[:, None] * stride_zb + kk[None, :], bk_ok,
                                     bk_ok & z_first[:, None], piv[:, None], HAS_RES, NORM)
                s1 += d
                s2 += d * d
                x = xin.to(w_ptr.dtype.element_ty) if not UPCAST_DOT else xin
            if HAS_SCALE and not UPCAST_DOT:  # fp8 weights (exact in fp16), scaled per row after the sum
                w = w.to(tl.float16)
            acc = dot_acc(acc, x, tl.trans(w), UPCAST_DOT, DOT_IEEE)
            if GATED:
                u = tl.load(u_rows + kk[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
                acc_u = dot_acc(acc_u, x, tl.trans(u), UPCAST_DOT, DOT_IEEE)
        out = acc
        out_u = acc_u

    if NORM != 0:
        # the statistics of z over all K features (every program summed them in its loop)
        ms = tl.sum(s2, axis=1)[:, None] / K
        if NORM == 1:
            dm = tl.sum(s1, axis=1)[:, None] / K  # mean - pivot
            rstd = 1.0 / tl.sqrt(tl.maximum(ms - dm * dm, 0.0) + eps)
            out = (out - dm * tl.load(rs_ptr + src, mask=live, other=0.0)[None, :]) * rstd
        else:
            rstd = 1.0 / tl.sqrt(ms + eps)
            out = out * rstd
            if GATED:
                out_u = out_u * rstd
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + src, mask=live, other=0.0)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + src, mask=live, other=0.0).to(tl.float32)
        out += bias[None, :]
    if RELU:
        out = tl.where(out < 0.0, 0.0, out)  # NaN stays NaN, as torch.relu leaves it (tl.maximum would give 0)
    if GATED:
        out = out / (1.0 + tl.exp(-out)) * out_u  # silu(gate) * up
    out = tl.where(live[None, :], out, 0.0)
    y_ptrs = y_ptr + offs_b[:, None] * stride_yb + rows[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & (rows < n_rows)[None, :])


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


# Two families for one token, tuned over together: plain loops pipelined by num_stages (with fewer rows per program
# and whole 1-2k pieces of a row among them: more programs, a shorter tail), and loops that load the next piece of
# the rows before this piece's products (PREFETCH, see the kernel).
_SINGLE_PLAIN = [
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 512}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 512}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 2, "BLOCK_K": 1024}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024}, num_warps=8, num_stages=2),
]
_SINGLE_PREFETCH = [
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 512, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 256, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 2, "BLOCK_K": 1024, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024, "PREFETCH": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 512, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512, "PREFETCH": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024, "PREFETCH": 1}, num_warps=8, num_stages=1),
]
_SINGLE_CONFIGS = configs_for_platform(_SINGLE_PREFETCH + _SINGLE_PLAIN)
_BATCHED_CONFIGS = configs_for_platform([
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4, num_stages=3),
])
_KEY = ["K", "ROWS_BUCKET", "BLOCK_B", "HAS_COUNT", "GATED", "HAS_SCALE", "NORM", "HAS_RES"]
# a launch whose shape has a pinned config for this device (shadow_kernels.tuned) skips the timing
_rows_gemv_single = triton.autotune(_SINGLE_CONFIGS, key=_KEY, do_bench=autotune_bench,
                                    prune_configs_by={"early_config_prune": pinned_prune("rows_single", "w_ptr")})(
    triton.heuristics({"EVEN_K": _even_k})(_rows_gemv_kernel))
_rows_gemv_batched = triton.autotune(_BATCHED_CONFIGS, key=_KEY, do_bench=autotune_bench)(
    triton.heuristics({"EVEN_K": _even_k})(_rows_gemv_kernel))


def launch_rows_gemv(weight, x2d, idx, bias, count, relu: bool, out_dtype: torch.dtype, up=None,
                     pdl: bool | None = None, scale=None, preload: bool = False, norm=None, residual=None,
                     z=None) -> torch.Tensor:
    """Launcher shared by gather_rows_gemv, gather_swiglu_gemv, fused_predictor and norm_rows_gemv; inputs
    are checked.

    ``idx=None`` means every row of ``weight`` in order (a plain GEMV). ``up``: SwiGLU's up weight,
    same shape as ``weight`` (the gate); the output is then ``silu(x @ gate.T) * (x @ up.T)``.
    ``scale``: fp32 [N], one factor per weight row applied to its sum before the bias (fp8 weights).
    ``preload``: see :func:`gather_rows_gemv`.
    ``norm``: a :class:`shadow_kernels.norm_gemv.NormFold` whose norm of ``x + residual`` the kernel folds in
    (``bias`` is then the fold's fp32 shift); ``z`` [B, K] receives ``x + residual`` (with a residual).
    """
    B, K = x2d.shape
    n_rows = weight.shape[0] if idx is None else idx.shape[0]
    y = torch.empty((B, n_rows), device=x2d.device, dtype=out_dtype)
    if n_rows == 0 or B == 0:
        if residual is not None:  # no program runs: the residual stream is still owed
            torch.add(x2d, residual, out=z)
        return y
    x2d = x2d.contiguous()
    kernel, block_b = gemv_kernel_for(B, _rows_gemv_single, _rows_gemv_batched)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(B, block_b))
    kind = 0 if norm is None else (1 if norm.kind == "layer" else 2)
    kernel[grid](
        weight, up if up is not None else weight, x2d, idx if idx is not None else weight,
        bias if bias is not None else weight,
        count if count is not None else weight, y, scale if scale is not None else y,
        residual if residual is not None else x2d, norm.weight if norm is not None else x2d,
        norm.rowsum if norm is not None and norm.rowsum is not None else y, z if z is not None else x2d,
        B, K, n_rows, norm.eps if norm is not None else 0.0,
        weight.stride(0), x2d.stride(0), y.stride(0),
        residual.stride(0) if residual is not None else 0, z.stride(0) if z is not None else 0,
        # a dense norm-folding GEMV is tuned for its exact row count: qkv and fc1 of OPT-1.3B (6144 and 8192 rows)
        # share the power-of-two bucket, and the config tuned on one ran the other slower (fc1 18.5 us
        # in the bucket, 15.5 us tuned alone; notes/models.md)
        n_rows if norm is not None and idx is None else next_pow2(n_rows),
        HAS_IDX=idx is not None, HAS_BIAS=bias is not None, HAS_COUNT=count is not None, RELU=relu,
        GATED=up is not None, HAS_SCALE=scale is not None,
        UPCAST_DOT=INTERPRET, DOT_IEEE=weight.dtype == torch.float32, BLOCK_B=block_b, PRELOAD=preload,
        NORM=kind, HAS_RES=residual is not None,
        **pdl_kwargs(x2d.device, pdl),
    )
    return y


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def gather_rows_gemv(weight, x, idx, bias=None, activation=None, count=None, *, validate=True, preload=False):
    """``act(x @ weight[idx].T + bias[idx])`` with a Triton kernel.

    weight: [N, K] fp16/bf16/fp32, contiguous rows. x: [K] or [B, K], same dtype.
    idx: int32/int64 [k] with values in [0, N); order and duplicates are kept as given.
    bias: [N] or None. activation: None or "relu".
    count: optional one-element int32 device tensor; only ``idx[:count]`` is used and the output
    slots from ``count`` on are 0 (padded index lists of global top-k).
    validate: check index values (reads them back to the host; skipped during CUDA graph capture).
    preload: with programmatic dependent launch, read idx, count and the first weights before waiting
    for the kernel launched just before this one; only x waits. Correct only when that kernel writes
    none of them (the decoder: plan buffers are filled several launches before a layer's GEMVs).
    Returns [k] or [B, k] in the weight dtype; accumulation is fp32.
    """
    check_float("weight", weight, ndims=(2,), last_contiguous=True)
    dev = weight.device
    N, K = weight.shape
    check_float("x", x, ndims=(1, 2), dtype=weight.dtype, device=dev)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but weight is [{N}, {K}]; expected x [..., {K}]")
    check_indices("idx", idx, n=N, device=dev, validate=validate)
    if bias is not None:
        check_float("bias", bias, ndims=(1,), dtype=weight.dtype, device=dev)
        if bias.shape[0] != N:
            raise ValueError(f"bias has {bias.shape[0]} entries; expected {N} (one per weight row)")
    _check_activation(activation)
    check_count("count", count, device=dev, upper=idx.shape[0], validate=validate)
    check_flag("preload", preload)
    y = launch_rows_gemv(weight, x if x.dim() == 2 else x[None], idx, bias, count, activation == "relu", weight.dtype,
                         preload=preload)
    return y.reshape(idx.shape[0]) if x.dim() == 1 else y


def gather_rows_gemv_ref(weight, x, idx, bias=None, activation=None, count=None, *, validate=True, preload=False):
    """Plain-PyTorch reference of :func:`gather_rows_gemv` (same signature, fp32 accumulate)."""
    _check_activation(activation)
    idx = idx.long()
    w = weight.index_select(0, idx).float()
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.index_select(0, idx).float()
    if activation == "relu":
        y = torch.relu(y)
    return zero_past_count(y, count).to(weight.dtype)


def check_up(gate, up) -> None:
    """SwiGLU's up weight: gate's shape, dtype, device and row stride (the kernel reads both rows at one offset)."""
    check_float("up", up, ndims=(2,), dtype=gate.dtype, device=gate.device, last_contiguous=True)
    if up.shape != gate.shape or up.stride(0) != gate.stride(0):
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)} and row stride, got {tuple(up.shape)}")


def gather_swiglu_gemv(gate, up, x, idx, count=None, *, validate=True):
    """``silu(x @ gate[idx].T) * (x @ up[idx].T)``: the selected SwiGLU neurons of a Llama MLP in one
    kernel (each selected neuron reads its gate row and its up row once).

    gate, up: [F, E] fp16/bf16/fp32 (same shape, dtype and row stride). x: [E] or [B, E]. idx, count:
    as in :func:`gather_rows_gemv`. Returns [k] or [B, k] in the weight dtype; fp32 accumulation.
    """
    check_float("gate", gate, ndims=(2,), last_contiguous=True)
    dev = gate.device
    N, K = gate.shape
    check_up(gate, up)
    check_float("x", x, ndims=(1, 2), dtype=gate.dtype, device=dev)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but gate is [{N}, {K}]; expected x [..., {K}]")
    check_indices("idx", idx, n=N, device=dev, validate=validate)
    check_count("count", count, device=dev, upper=idx.shape[0], validate=validate)
    y = launch_rows_gemv(gate, x if x.dim() == 2 else x[None], idx, None, count, False, gate.dtype, up=up)
    return y.reshape(idx.shape[0]) if x.dim() == 1 else y


def gather_swiglu_gemv_ref(gate, up, x, idx, count=None, *, validate=True):
    """Plain-PyTorch reference of :func:`gather_swiglu_gemv` (fp32, one rounding at the end)."""
    idx = idx.long()
    g = x.float() @ gate.index_select(0, idx).float().T
    y = torch.nn.functional.silu(g) * (x.float() @ up.index_select(0, idx).float().T)
    return zero_past_count(y, count).to(gate.dtype)
