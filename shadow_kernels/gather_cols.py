"""Gather-columns GEMV: ``y = h @ weight_t[idx] + bias``.

Used for fc2 and for out_proj over the selected heads. ``weight_t`` is W transposed ([N, M]: N
input features, M outputs), so the weights of one selected input feature are one contiguous row
and a warp reads them coalesced along M.

The reduction runs over the selected rows, which are few compared to the parallelism of a GPU
when M is small, so the rows are split into ``split`` chunks (split-K). Two ways to combine:
- deterministic (default): each chunk writes fp32 partial sums to a workspace and a second small
  kernel adds them in a fixed order, plus the bias; bit-identical from run to run.
- atomic: chunks ``atomic_add`` fp32 into a zeroed buffer (DejaVu's approach); the summation order
  varies between runs, so results differ in the last bits.
Both are timed in the benchmark. With ``split == 1`` one launch writes the output directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    autotune_bench,
    bias_only,
    check_float,
    check_indexed_input,
    configs_for_platform,
    dot_acc,
    gemv_kernel_for,
    next_pow2,
    sm_count,
    zero_past_count,
)
from .pdl import pdl_kwargs, pdl_sync
from .tuned import pinned_prune


@triton.jit
def _cols_partial_kernel(
    wt_ptr, h_ptr, idx_ptr, count_ptr, bias_ptr, out_ptr,
    B, M, n_sel,
    stride_wn, stride_hb, stride_ob, stride_os,
    SEL_BUCKET, SPLIT_KEY,  # only autotune keys
    HAS_COUNT: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, PREFETCH: tl.constexpr = 0,
    PRELOAD: tl.constexpr = False, OCC: tl.constexpr = 4,
):
    # A program owns BLOCK_M outputs for BLOCK_B batch rows and one chunk of the selected rows.
    # The chunk bounds are computed on the device from `count`, so the work of a padded index list
    # is spread over all programs whatever the count turns out to be.
    # MODE: 0 = write the final output (one chunk), 1 = write fp32 partials, 2 = fp32 atomic add.
    # The number of chunks is the grid's second dimension, chosen per config by the launcher.
    # OCC (programs per SM the split aims at) is read by the launcher only.
    if USE_PDL and not PRELOAD:  # see shadow_kernels.pdl
        pdl_sync()
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    limit = n_sel
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), n_sel)
    chunk = tl.cdiv(limit, tl.num_programs(1))
    j_start = pid_s * chunk
    j_end = tl.minimum(j_start + chunk, limit)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_j = tl.arange(0, BLOCK_J)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B

    # The row numbers of the next block are loaded one iteration ahead, so the weight loads never
    # wait on an index load (two dependent memory latencies per iteration halved the bandwidth).
    src = tl.load(idx_ptr + j_start + offs_j, mask=j_start + offs_j < j_end, other=0).to(tl.int64)
    if BLOCK_B == 1 and PREFETCH:
        # The weight tile of the next iteration is loaded before this one's products are summed, so
        # two tiles are in flight while the program waits (Triton pipelines only loads that feed tl.dot;
        # here a loop iteration otherwise waits for all its loads with nothing else outstanding).
        acc = tl.zeros([BLOCK_J, BLOCK_M], dtype=tl.float32)
        h_row = h_ptr + pid_b * stride_hb
        jj = j_start + offs_j
        j_ok = jj < j_end
        w = tl.load(wt_ptr + src[:, None] * stride_wn + offs_m[None, :], mask=j_ok[:, None] & m_ok[None, :],
                    other=0.0)
        if USE_PDL and PRELOAD:  # index list, count and first weights read before the wait (see launcher)
            pdl_sync()
        hv = tl.load(h_row + jj, mask=j_ok, other=0.0)
        nxt = jj + BLOCK_J
        src = tl.load(idx_ptr + nxt, mask=nxt < j_end, other=0).to(tl.int64)
        for j0 in range(j_start, j_end, BLOCK_J):
            jn = j0 + BLOCK_J + offs_j
            jn_ok = jn < j_end
            w_next = tl.load(wt_ptr + src[:, None] * stride_wn + offs_m[None, :],
                             mask=jn_ok[:, None] & m_ok[None, :], other=0.0)
            hv_next = tl.load(h_row + jn, mask=jn_ok, other=0.0)
            nn = jn + BLOCK_J
            src = tl.load(idx_ptr + nn, mask=nn < j_end, other=0).to(tl.int64)
            acc += w.to(tl.float32) * hv.to(tl.float32)[:, None]
            w = w_next
            hv = hv_next
        out = tl.sum(acc, axis=0)[None, :]
    elif BLOCK_B == 1:
        if USE_PDL and PRELOAD:
            pdl_sync()
        acc = tl.zeros([BLOCK_J, BLOCK_M], dtype=tl.float32)
        h_row = h_ptr + pid_b * stride_hb
        for j0 in range(j_start, j_end, BLOCK_J):
            jj = j0 + offs_j
            j_ok = jj < j_end
            nxt = jj + BLOCK_J
            src_next = tl.load(idx_ptr + nxt, mask=nxt < j_end, other=0).to(tl.int64)
            w = tl.load(wt_ptr + src[:, None] * stride_wn + offs_m[None, :], mask=j_ok[:, None] & m_ok[None, :],
                        other=0.0).to(tl.float32)
            hv = tl.load(h_row + jj, mask=j_ok, other=0.0).to(tl.float32)
            acc += w * hv[:, None]
            src = src_next
        out = tl.sum(acc, axis=0)[None, :]
    else:
        if USE_PDL and PRELOAD:
            pdl_sync()
        acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        for j0 in range(j_start, j_end, BLOCK_J):
            jj = j0 + offs_j
            j_ok = jj < j_end
            nxt = jj + BLOCK_J
            src_next = tl.load(idx_ptr + nxt, mask=nxt < j_end, other=0).to(tl.int64)
            w = tl.load(wt_ptr + src[:, None] * stride_wn + offs_m[None, :], mask=j_ok[:, None] & m_ok[None, :],
                        other=0.0)
            hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + jj[None, :], mask=b_ok[:, None] & j_ok[None, :],
                         other=0.0)
            acc = dot_acc(acc, hv, w, UPCAST_DOT, DOT_IEEE)
            src = src_next
        out = acc

    mask = b_ok[:, None] & m_ok[None, :]
    if MODE == 0:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_m[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        ptrs = out_ptr + pid_s * stride_os + offs_b[:, None] * stride_ob + offs_m[None, :]
        tl.store(ptrs, out, mask=mask)
    else:
        ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_m[None, :]
        tl.atomic_add(ptrs, out, mask=mask)


@triton.jit
def _sum_parts(part, stride, n, mask, total, MODE: tl.constexpr, LOG: tl.constexpr, R: tl.constexpr):
    """``total`` plus the sum of ``part[c * stride]`` for c < n, in an order fixed by MODE alone (bit-identical
    from run to run). A chunk past ``n`` loads +0.0.
    - MODE 1 (batched launches): chunk order, eight chunks loaded before any is added (one load and one add at a
      time waited for each L2 round trip in turn, 14-33 of them at the end of every split launch);
    - MODE 2 (one token): ``2**LOG`` chunks loaded at once as one [R, 2**LOG] tile (R = the number of outputs) and
      added as a pairwise tree, (c0 + c1) + (c2 + c3) and so on, by reshape and split: the order is the tree's
      whatever layout the compiler gives the tile. Groups of ``2**LOG`` are added in order. One round trip for up
      to ``2**LOG`` chunks where MODE 1 takes one per eight (its [R, 2**LOG] tile takes too many registers for a
      batched launch's outputs)."""
    if MODE == 1:
        for c in range(0, n, 8):
            cz = tl.zeros(mask.shape, dtype=tl.int32) + c  # a tensor: the interpreter takes no scalar in a mask
            p0 = tl.load(part + c * stride, mask=mask, other=0.0, cache_modifier=".cg")
            p1 = tl.load(part + (c + 1) * stride, mask=mask & (cz + 1 < n), other=0.0, cache_modifier=".cg")
            p2 = tl.load(part + (c + 2) * stride, mask=mask & (cz + 2 < n), other=0.0, cache_modifier=".cg")
            p3 = tl.load(part + (c + 3) * stride, mask=mask & (cz + 3 < n), other=0.0, cache_modifier=".cg")
            p4 = tl.load(part + (c + 4) * stride, mask=mask & (cz + 4 < n), other=0.0, cache_modifier=".cg")
            p5 = tl.load(part + (c + 5) * stride, mask=mask & (cz + 5 < n), other=0.0, cache_modifier=".cg")
            p6 = tl.load(part + (c + 6) * stride, mask=mask & (cz + 6 < n), other=0.0, cache_modifier=".cg")
            p7 = tl.load(part + (c + 7) * stride, mask=mask & (cz + 7 < n), other=0.0, cache_modifier=".cg")
            total += p0
            total += p1
            total += p2
            total += p3
            total += p4
            total += p5
            total += p6
            total += p7
    else:
        G: tl.constexpr = 1 << LOG
        flat = tl.reshape(part, (R,))
        ok = tl.reshape(mask, (R,))
        chunk = tl.arange(0, G)
        acc = tl.reshape(total, (R,))
        for c in range(0, n, G):
            cc = chunk[None, :] + c
            t = tl.load(flat[:, None] + cc * stride, mask=ok[:, None] & (cc < n), other=0.0, cache_modifier=".cg")
            for i in tl.static_range(LOG):
                a, b = tl.split(tl.reshape(t, (R, G >> (i + 1), 2)))
                t = a + b
            acc += tl.reshape(t, (R,))
        total = tl.reshape(acc, total.shape)
    return total


@triton.jit
def _cols_reduce_kernel(part_ptr, bias_ptr, y_ptr, total, M, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr, SUM_MODE: tl.constexpr = 2, SUM_LOG: tl.constexpr = 5):
    if USE_PDL:
        # The one kernel of this package that lets the next one be scheduled before its own wait (see
        # shadow_kernels.pdl), so that a preloading GEMV after it starts during the split launch as it would
        # after a one-launch gather-cols. Safe: what that kernel reads before its wait must not be written by
        # the kernel before it (this one writes only y, after its wait), and the split launch that this one
        # waits for writes only the partials workspace, which nothing else reads. Every read the next kernel
        # makes after its wait still follows this kernel's end, and so the split launch's.
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    # Sums the SPLIT partials of every output in a fixed order (deterministic), adds the bias.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = _sum_parts(part_ptr + offs, total, SPLIT, ok, tl.zeros([BLOCK], dtype=tl.float32), SUM_MODE, SUM_LOG,
                     BLOCK)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % M, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# Two families for one token, tuned over together: plain loops (pipelined by num_stages), and loops that load the next
# tile's weights before this tile's products are summed (PREFETCH). Wider BLOCK_M alone (longer pieces of each row)
# lost 5-10% on fc2; the two wide configs kept here won some out_proj shapes (notes/kernels.md).
_SINGLE_PLAIN = [
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_J": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_J": 32}, num_warps=8, num_stages=3),
]
_SINGLE_PREFETCH = [
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 16, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 32, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 32, "PREFETCH": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 64, "PREFETCH": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_J": 32, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 256, "BLOCK_J": 16, "PREFETCH": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 256, "BLOCK_J": 32, "PREFETCH": 1}, num_warps=8, num_stages=1),
    # more programs per SM: more bytes in flight where few output blocks split few rows (out_proj)
    triton.Config({"BLOCK_M": 64, "BLOCK_J": 32, "PREFETCH": 1, "OCC": 8}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 16, "PREFETCH": 1, "OCC": 8}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 32, "PREFETCH": 1, "OCC": 8}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_J": 16, "PREFETCH": 1, "OCC": 16}, num_warps=2, num_stages=1),
]
_SINGLE_CONFIGS = configs_for_platform(_SINGLE_PREFETCH + _SINGLE_PLAIN)
_BATCHED_CONFIGS = configs_for_platform([
    triton.Config({"BLOCK_M": 64, "BLOCK_J": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_J": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_J": 32}, num_warps=8, num_stages=3),
])
_KEY = ["M", "SEL_BUCKET", "SPLIT_KEY", "BLOCK_B", "MODE", "HAS_COUNT"]
# shapes with a pinned config for this device (shadow_kernels.tuned) skip the timing
_cols_single = triton.autotune(_SINGLE_CONFIGS, key=_KEY, do_bench=autotune_bench, restore_value=["out_ptr"],
                               prune_configs_by={"early_config_prune": pinned_prune("cols_single", "wt_ptr")})(
    _cols_partial_kernel)
_cols_batched = triton.autotune(_BATCHED_CONFIGS, key=_KEY, do_bench=autotune_bench, restore_value=["out_ptr"])(
    _cols_partial_kernel)

# The split partials are summed by a second small kernel (launched programmatically, already resident when the
# split launch ends). Having the last program of each output block sum them inside the split launch (a ticket per
# block) measured within -0.1..+1.1 us a call of it and 0.5-1.0% slower per decode step (notes/kernels.md, at
# f30fce0), and it needed a zeroed counter buffer outside CUDA graphs; it was removed.
_TREE_MAX_LOG = 5  # at most 32 chunks' partials in one tile


def settings() -> dict:
    """How gather-cols reduces and which configs it tunes over now (latency rows record it)."""
    default = _cols_single.configs == list(_SINGLE_CONFIGS)
    return {"reduction": "second kernel, pairwise tree (one token) / groups of eight (batched)",
            "configs": "default" if default else "custom"}


_MAX_SPLIT: dict = {}
# Rows of the selected list one program should at least stream before splitting further pays off.
_MIN_ROWS_PER_SPLIT = 64


def choose_split(n_sel: int, M: int, block_m: int, device: torch.device, per_sm: int = 4) -> int:
    """Split the reduction so that at most ``per_sm`` programs per SM (a config's OCC) are launched: one wave;
    rounding up launched up to one program per output block more and was slower."""
    m_blocks = triton.cdiv(M, block_m)
    want = max(1, per_sm * sm_count(device) // m_blocks)
    return max(1, min(want, triton.cdiv(n_sel, _MIN_ROWS_PER_SPLIT)))


def _launch_cols(weight_t, h2d, idx, bias, count, deterministic: bool, split: int | None,
                 out_dtype: torch.dtype | None = None, preload: bool = False) -> torch.Tensor:
    # The split depends on the config's BLOCK_M, which the autotuner picks, so the grid is a function
    # of the config, the workspace is sized for the largest split any config can use, and the
    # reduction reads the split of the config that ran.
    B = h2d.shape[0]
    n_sel = idx.shape[0]
    M = weight_t.shape[1]
    dev = weight_t.device
    y = torch.empty((B, M), device=dev, dtype=out_dtype or weight_t.dtype)
    if B == 0 or M == 0:
        return y
    if n_sel == 0:
        return bias_only(y, bias)
    h2d = h2d.contiguous()
    kernel, block_b = gemv_kernel_for(B, _cols_single, _cols_batched)
    def split_of(kw) -> int:  # a config's kwargs (or a launch's meta)
        return split or choose_split(n_sel, M, kw["BLOCK_M"], dev, kw.get("OCC", 4))

    # The largest split any config can use sizes the workspace: computed once per config list and shape. The key
    # holds the list itself (a tuner restricted to other configs has another list), so its id cannot be reused.
    key = (id(kernel.configs), n_sel, M, split, dev.index)
    hit = _MAX_SPLIT.get(key)
    if hit is not None and hit[0] is kernel.configs:
        max_split = hit[1]
    else:
        max_split = max(split_of(c.kwargs) for c in kernel.configs)
        _MAX_SPLIT[key] = (kernel.configs, max_split)
    if max_split == 1:
        mode, out = 0, y
    elif deterministic:
        mode, out = 1, torch.empty((max_split, B, M), device=dev, dtype=torch.float32)
    else:
        mode, out = 2, torch.zeros((B, M), device=dev, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), split_of(meta), triton.cdiv(B, block_b))
    sum_mode = 2 if block_b == 1 else 1
    sum_log = min(_TREE_MAX_LOG, max(1, (max_split - 1).bit_length()))
    kernel[grid](
        weight_t, h2d, idx, count if count is not None else idx, bias if bias is not None else weight_t, out,
        B, M, n_sel,
        weight_t.stride(0), h2d.stride(0), M, B * M,
        next_pow2(n_sel), split or 0,
        HAS_COUNT=count is not None, HAS_BIAS=bias is not None, MODE=mode,
        # fp32 activations with 16-bit weights (the sparse-hidden predictor) keep fp32 in the dot
        UPCAST_DOT=INTERPRET or h2d.dtype != weight_t.dtype,
        DOT_IEEE=torch.float32 in (weight_t.dtype, h2d.dtype), BLOCK_B=block_b, PRELOAD=preload,
        **pdl_kwargs(dev),
    )
    if mode in (1, 2):
        n_parts = split_of(kernel.best_config.kwargs) if mode == 1 else 1
        block = 128 if sum_mode == 2 else 1024  # the tree's tile is [block, 2**sum_log] fp32
        _cols_reduce_kernel[(triton.cdiv(B * M, block),)](
            out, bias if bias is not None else out, y, B * M, M, n_parts,
            HAS_BIAS=bias is not None, BLOCK=block, SUM_MODE=sum_mode, SUM_LOG=sum_log, **pdl_kwargs(dev),
        )
    return y


def gather_cols_gemv(weight_t, h, idx, bias=None, count=None, *, deterministic=True, split=None, validate=True,
                     preload=False):
    """``h @ weight_t[idx] + bias`` with Triton kernels.

    weight_t: [N, M] (W transposed, contiguous rows) fp16/bf16/fp32. h: [k] or [B, k], same dtype;
    column j of h multiplies row idx[j] of weight_t. idx: int32/int64 [k] in [0, N).
    bias: [M] or None. count: optional one-element int32 device tensor; only the first ``count``
    entries of idx (and of h) are used.
    deterministic: fixed-order two-stage reduction (default) or fp32 atomics (not bit-reproducible).
    split: number of chunks of the reduction (default: chosen from the shape and the SM count).
    preload: with programmatic dependent launch, read idx, count and the first weights before waiting
    for the kernel launched just before this one; only h waits. Correct only when that kernel writes
    none of them (see :func:`shadow_kernels.gather_rows_gemv`).
    Returns [M] or [B, M] in the weight dtype; accumulation is fp32.
    """
    check_float("weight_t", weight_t, ndims=(2,), last_contiguous=True)
    N, M = weight_t.shape
    check_indexed_input("h", h, weight_t, idx, bias, count, n_idx=N, n_out=M, validate=validate, preload=preload)
    if split is not None and (not isinstance(split, int) or split < 1):
        raise ValueError(f"split must be a positive int or None, got {split!r}")
    y = _launch_cols(weight_t, h if h.dim() == 2 else h[None], idx, bias, count, deterministic, split,
                     preload=preload)
    return y.reshape(M) if h.dim() == 1 else y


def gather_cols_gemv_ref(weight_t, h, idx, bias=None, count=None, *, deterministic=True, split=None, validate=True,
                         preload=False):
    """Plain-PyTorch reference of :func:`gather_cols_gemv` (same signature, fp32 accumulate)."""
    idx = idx.long()
    hf = zero_past_count(h.float(), count)
    y = hf @ weight_t.index_select(0, idx).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(weight_t.dtype)
