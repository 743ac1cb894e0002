"""Tests that need a CUDA device: real layer shapes, and capture of a sparse step in a CUDA graph."""

import pytest
import torch

from shadow_kernels import (
    fused_predictor,
    fused_predictor_ref,
    gather_cols_gemv,
    gather_cols_gemv_ref,
    gather_rows_gemv,
    topk_indices,
)

from conftest import DEVICE
from helpers import assert_close_rel, check_pdl_chain, only_configs, randn

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("E", [2048, 5120])
def test_opt_ffn_shapes(dtype, batch, E):
    gen = torch.Generator().manual_seed(E + batch)
    F = 4 * E
    w1 = randn(F, E, dtype=dtype, gen=gen, scale=E**-0.5)
    b1 = randn(F, dtype=dtype, gen=gen)
    w2t = randn(F, E, dtype=dtype, gen=gen, scale=F**-0.5)
    x = randn(batch, E, dtype=dtype, gen=gen)
    idx = torch.randperm(F, generator=gen)[: F // 2].sort().values.to(DEVICE)
    h = gather_rows_gemv(w1, x, idx, b1, "relu")
    ref_h = torch.relu(x.float() @ w1[idx].float().T + b1[idx].float())
    assert_close_rel(h, ref_h, dtype)
    for deterministic in (True, False):
        y = gather_cols_gemv(w2t, h, idx, deterministic=deterministic)
        assert_close_rel(y, h.float() @ w2t[idx].float(), dtype)


def test_predictor_shape_of_opt_1_3b():
    gen = torch.Generator().manual_seed(0)
    E, H, O = 2048, 2048, 23 * (32 + 8192)
    w1 = randn(H, E, dtype=torch.float16, gen=gen, scale=E**-0.5)
    w2 = randn(O, H, dtype=torch.float16, gen=gen, scale=H**-0.5)
    b1, b2 = randn(H, dtype=torch.float16, gen=gen), randn(O, dtype=torch.float16, gen=gen)
    x = randn(E, dtype=torch.float16, gen=gen)
    assert_close_rel(fused_predictor(x, w1, b1, w2, b2), fused_predictor_ref(x, w1, b1, w2, b2), torch.float16)


def test_sparse_ffn_step_replays_in_a_cuda_graph():
    """Global top-k + fc1 + fc2 of every layer, captured once, replayed with new scores: the
    replay must equal an eager run, which shows that no shape or host read depends on the data."""
    gen = torch.Generator().manual_seed(1)
    L, E, F = 3, 256, 1024
    k_total = L * F // 2
    w1 = [randn(F, E, dtype=torch.float16, gen=gen, scale=E**-0.5) for _ in range(L)]
    w2t = [randn(F, E, dtype=torch.float16, gen=gen, scale=F**-0.5) for _ in range(L)]
    scores = randn(L, F, gen=gen)
    x = randn(E, dtype=torch.float16, gen=gen)

    def step():
        sel = topk_indices(scores, k_total, "global", validate=False)
        h = x
        for layer in range(L):
            idx, count = sel.layer(layer)
            a = gather_rows_gemv(w1[layer], h, idx, None, "relu", count=count, validate=False)
            h = h + gather_cols_gemv(w2t[layer], a, idx, None, count=count, validate=False)
        return h

    step()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        scores.copy_(randn(L, F, gen=torch.Generator().manual_seed(100 + seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step())


def test_atomic_mode_first_call_is_not_double_counted():
    """Autotuning runs the kernel several times on the first call of a shape; the accumulation
    buffer must still start from zero for the call that counts."""
    gen = torch.Generator().manual_seed(2)
    wt = randn(3000, 777, dtype=torch.float16, gen=gen)
    h = randn(3000, dtype=torch.float16, gen=gen)
    idx = torch.arange(3000, device=DEVICE)
    y = gather_cols_gemv(wt, h, idx, deterministic=False)
    assert_close_rel(y, h.float() @ wt.float(), torch.float16)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("n_in,M,keep", [(8192, 2048, 4096), (5120, 5120, 2560), (20480, 5120, 10240), (512, 96, 7)])
def test_deterministic_reduction_gives_the_same_bits_every_call_and_replay(batch, n_in, M, keep):
    """The split partials are summed in a fixed order by the second kernel: repeated calls, with and without a
    device-side count, and replays of a captured call give identical outputs."""
    gen = torch.Generator().manual_seed(n_in + M + batch)
    wt = randn(n_in, M, dtype=torch.float16, gen=gen, scale=n_in**-0.5)
    bias = randn(M, dtype=torch.float16, gen=gen)
    idx = torch.randperm(n_in, generator=gen)[:keep].to(DEVICE, torch.int32)
    h = randn(batch, keep, dtype=torch.float16, gen=gen)
    count = torch.tensor([max(1, keep - 3)], dtype=torch.int32, device=DEVICE)
    for cnt in (None, count):
        first = gather_cols_gemv(wt, h, idx, bias, cnt)
        assert_close_rel(first, gather_cols_gemv_ref(wt, h, idx, bias, cnt), torch.float16)
        for _ in range(3):
            assert torch.equal(gather_cols_gemv(wt, h, idx, bias, cnt), first)
    ref = gather_cols_gemv(wt, h, idx, bias)
    out = torch.empty_like(ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(gather_cols_gemv(wt, h, idx, bias))
    for _ in range(4):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)


@pytest.mark.parametrize("preload", [False, True])
def test_pdl_launches_give_the_same_bits_in_a_graph(preload):
    """A chain of gather GEMVs launched with programmatic dependent launch, eagerly and in a CUDA graph,
    equals the same chain without it: every kernel waits for its producer before reading (with preload,
    before reading its input; the index lists and weights are never written in the chain)."""

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    gen = torch.Generator().manual_seed(5)
    E, F, L = 1024, 4096, 6
    w1 = [randn(F, E, dtype=torch.float16, gen=gen, scale=E**-0.5) for _ in range(L)]
    w2t = [randn(F, E, dtype=torch.float16, gen=gen, scale=F**-0.5) for _ in range(L)]
    idx = [torch.randperm(F, generator=gen)[: F // 3].sort().values.to(DEVICE, torch.int32) for _ in range(L)]
    x0 = randn(E, dtype=torch.float16, gen=gen)

    def chain():
        x = x0
        for a, b, i in zip(w1, w2t, idx, strict=True):
            h = gather_rows_gemv(a, x, i, None, "relu", validate=False, preload=preload)
            x = gather_cols_gemv(b, h, i, validate=False, preload=preload) + x
        return x

    check_pdl_chain(chain)


@pytest.mark.parametrize("batch", [1, 4])
def test_fp8_predictor_kernel_matches_its_reference(batch):
    """The fused predictor with a float8 second layer and per-output scales (Triton) against the fp32
    reference on the same quantised weights; and its ranking against the fp16 predictor's."""
    from shadow_kernels import quantize_rows_fp8

    gen = torch.Generator().manual_seed(batch)
    E, H, O = 1024, 2048, 23 * (32 + 8192)
    w1 = randn(H, E, dtype=torch.float16, gen=gen, scale=E**-0.5)
    w2 = randn(O, H, dtype=torch.float16, gen=gen, scale=H**-0.5)
    b1, b2 = randn(H, dtype=torch.float16, gen=gen), randn(O, dtype=torch.float16, gen=gen)
    x = randn(batch, E, dtype=torch.float16, gen=gen)
    q, scale = quantize_rows_fp8(w2)
    got = fused_predictor(x, w1, b1, q, b2, w2_scale=scale)
    assert_close_rel(got, fused_predictor_ref(x, w1, b1, q, b2, w2_scale=scale), torch.float16)
    full = fused_predictor(x, w1, b1, w2, b2)
    keep = O // 2
    top = lambda s: torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(keep).indices, True)
    agree = (top(got) & top(full)).sum() / (batch * keep)
    assert float(agree) > 0.9


@pytest.mark.parametrize("kind", ["rows", "cols"])
def test_every_single_token_config_matches_the_reference(kind):
    """Each batch-1 config alone (plain and prefetching ones), on a shape with a ragged tail and a
    device-side count: the autotuner may pick any of them."""
    from shadow_kernels import gather_cols, gather_cols_gemv_ref, gather_rows, gather_rows_gemv_ref

    tuner = gather_rows._rows_gemv_single if kind == "rows" else gather_cols._cols_single
    gen = torch.Generator().manual_seed(5)
    N, K, keep = 3000, 2000 + 24, 1100
    w = randn(N, K, dtype=torch.float16, gen=gen, scale=K**-0.5)
    idx = torch.randperm(N, generator=gen)[:keep].to(DEVICE, torch.int32)
    count = torch.tensor([keep - 77], dtype=torch.int32, device=DEVICE)
    x = randn(K if kind == "rows" else keep, dtype=torch.float16, gen=gen)
    bias = randn(N if kind == "rows" else K, dtype=torch.float16, gen=gen)
    for cfg in list(tuner.configs):
        with only_configs(tuner, [cfg]):
            if kind == "rows":
                got = gather_rows_gemv(w, x, idx, bias, "relu", count=count)
                ref = gather_rows_gemv_ref(w, x, idx, bias, "relu", count=count)
            else:
                got = gather_cols_gemv(w, x, idx, bias, count=count)
                ref = gather_cols_gemv_ref(w, x, idx, bias, count=count)
            assert_close_rel(got, ref, torch.float16)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_every_norm_fold_config_matches_the_reference(batch, kind):
    """norm_rows_gemv (the norm of x + r folded into the GEMV) with each rows config alone, on a ragged K with
    a device-side count, a residual stream with a large mean (OPT's outlier features) and a SwiGLU pair."""
    from shadow_kernels import (
        fold_norm,
        gather_rows,
        norm_rows_gemv,
        norm_rows_gemv_ref,
        norm_swiglu_gemv,
        norm_swiglu_gemv_ref,
    )

    tuner = gather_rows._rows_gemv_single if batch == 1 else gather_rows._rows_gemv_batched
    every = gather_rows._SINGLE_CONFIGS if batch == 1 else gather_rows._BATCHED_CONFIGS
    gen = torch.Generator().manual_seed(8)
    N, K, keep = 3000, 2048 + 40, 1100
    w = randn(N, K, dtype=torch.float16, gen=gen, scale=K**-0.5)
    up = randn(N, K, dtype=torch.float16, gen=gen, scale=K**-0.5)
    g = (1 + 0.2 * randn(K, gen=gen)).half()
    beta = randn(K, dtype=torch.float16, gen=gen, scale=0.1) if kind == "layer" else None
    b = randn(N, dtype=torch.float16, gen=gen)
    fold = fold_norm(w, g, beta, b, kind=kind)
    idx = torch.randperm(N, generator=gen)[:keep].to(DEVICE, torch.int32)
    count = torch.tensor([keep - 77], dtype=torch.int32, device=DEVICE)
    x = (randn(batch, K, gen=gen, scale=4.0) + 20.0).half()
    r = randn(batch, K, dtype=torch.float16, gen=gen)
    for cfg in every:
        with only_configs(tuner, [cfg]):
            y, z = norm_rows_gemv(w, x, idx, fold, r, "relu", count, preload=True)
            y_ref, z_ref = norm_rows_gemv_ref(w, x, idx, fold, r, "relu", count)
            assert torch.equal(z, z_ref)
            assert_close_rel(y, y_ref, torch.float16)
            if kind == "rms":  # the SwiGLU pair (the prefetching loop too)
                fold_g = fold_norm(w, g, kind="rms")
                y, z = norm_swiglu_gemv(w, up, x, idx, fold_g, r, count)
                assert_close_rel(y, norm_swiglu_gemv_ref(w, up, x, idx, fold_g, r, count)[0], torch.float16)


def test_norm_fold_chain_with_pdl_gives_the_same_bits_in_a_graph():
    """A pre-norm chain of fused norm GEMVs (qkv-like, then fc1-like reading the stream the first wrote),
    launched with programmatic dependent launch and preload, eagerly and in a CUDA graph, equals the same chain
    without PDL: each kernel reads x and r only after its producer has finished."""
    from shadow_kernels import fold_norm, norm_rows_gemv

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    gen = torch.Generator().manual_seed(9)
    E, L = 1024, 6
    ws = [randn(E, E, dtype=torch.float16, gen=gen, scale=E**-0.5) for _ in range(L)]
    folds = [fold_norm(w, (1 + 0.1 * randn(E, gen=gen)).half(), randn(E, dtype=torch.float16, gen=gen, scale=0.1),
                       randn(E, dtype=torch.float16, gen=gen, scale=0.1)) for w in ws]
    idx = torch.randperm(E, generator=gen)[: E // 2].sort().values.to(DEVICE, torch.int32)
    x0 = randn(E, dtype=torch.float16, gen=gen)

    def chain():
        x, o = x0, None
        for w, f in zip(ws, folds, strict=True):
            y, x = norm_rows_gemv(w, x, None, f, o, "relu", validate=False, preload=True)
            o = y * 0.5  # a PyTorch kernel between, as attention or fc2 would be
            y2, x = norm_rows_gemv(w, x, idx, f, o, validate=False, preload=True)
            o = torch.zeros_like(x).index_copy_(0, idx.long(), y2)
        return x + o

    check_pdl_chain(chain)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("preload", [False, True])
def test_attention_chain_with_pdl_gives_the_same_bits_in_a_graph(preload, D):
    """Q/K/V GEMV -> decode attention (some heads skipped, holes in the cache) -> out_proj, layer after layer with
    programmatic dependent launch, eagerly and in a CUDA graph, equals the chain without PDL: with preload the
    attention reads the cache, its flags, pos and the slots before the GEMV before it finishes, and qkv only
    after. 256 positions of D=64 are one preloaded tile (one launch); D=128 is the split."""
    from shadow_kernels.decode_attention import decode_attention

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    gen = torch.Generator().manual_seed(11)
    H, T, L = 16, 256, 4
    E = H * D
    wqkv = [randn(3 * E, E, dtype=torch.float16, gen=gen, scale=E**-0.5) for _ in range(L)]
    wo = [randn(E, E, dtype=torch.float16, gen=gen, scale=E**-0.5) for _ in range(L)]
    kc = [randn(1, H, T, D, dtype=torch.float16, gen=gen) for _ in range(L)]
    vc = [randn(1, H, T, D, dtype=torch.float16, gen=gen) for _ in range(L)]
    valid = [(torch.rand(1, H, T, generator=gen) < 0.8).to(DEVICE, torch.uint8) for _ in range(L)]
    keep = torch.randperm(H, generator=gen)[: 3 * H // 4].sort().values
    slot = torch.full((H,), -1, dtype=torch.int32)
    slot[keep] = torch.arange(keep.numel(), dtype=torch.int32)
    slot = slot.to(DEVICE)
    rows = (keep[:, None] * 3 * D + torch.arange(3 * D)).reshape(-1).to(DEVICE, torch.int32)
    cols = (keep[:, None] * D + torch.arange(D)).reshape(-1).to(DEVICE, torch.int32)  # out_proj.T rows of the heads
    pos = torch.tensor([200], device=DEVICE)
    x0 = randn(E, dtype=torch.float16, gen=gen)

    def chain():
        x = x0
        for i in range(L):
            qkv = gather_rows_gemv(wqkv[i], x, rows, validate=False, preload=True)
            heads = decode_attention(qkv[None], kc[i], vc[i], valid[i], pos, slot, preload=preload)
            x = gather_cols_gemv(wo[i], heads[0], cols, validate=False, preload=True) + x
        return x

    check_pdl_chain(chain)


@pytest.mark.parametrize("batch,D", [(1, 128), (1, 80), (8, 128)])
def test_every_segments_config_matches_the_reference(batch, D):
    """gather_segments_gemv (out_proj over the selected heads) with each config alone, on OPT-13B's head size
    and OPT-2.7B's (80, not a power of two), with a device-side count."""
    from shadow_kernels import gather_segments, gather_segments_gemv, gather_segments_gemv_ref

    tuner = gather_segments._segments_single if batch == 1 else gather_segments._segments_batched
    every = gather_segments._SINGLE_CONFIGS if batch == 1 else gather_segments._BATCHED_CONFIGS
    gen = torch.Generator().manual_seed(6)
    N, H = 3001, 40
    w = randn(N, H * D, dtype=torch.float16, gen=gen, scale=(H * D) ** -0.5)
    heads = torch.randperm(H, generator=gen)[:23]
    idx = (heads[:, None] * D + torch.arange(D)).reshape(-1).to(DEVICE, torch.int32)
    count = torch.tensor([20 * D], dtype=torch.int32, device=DEVICE)
    x = randn(*(() if batch == 1 else (batch,)), idx.numel(), dtype=torch.float16, gen=gen)
    b = randn(N, dtype=torch.float16, gen=gen)
    for cfg in every:
        with only_configs(tuner, [cfg]):
            got = gather_segments_gemv(w, x, idx, b, count, segment=D)
            assert_close_rel(got, gather_segments_gemv_ref(w, x, idx, b, count, segment=D), torch.float16)


@pytest.mark.parametrize("L,n", [(39, 20480), (39, 40), (1, 8192)])
@pytest.mark.parametrize("policy", ["global", "local"])
def test_radix_topk_in_a_cuda_graph(policy, L, n):
    """The radix select on OPT-13B's neuron and head scores and one 1.3B layer's neurons (multi-launch
    and one-launch paths) equals the stable-sort reference, also replayed in a CUDA graph on new scores
    (the histograms of the multi-launch path are zeroed inside the graph)."""
    from shadow_kernels import topk_indices_ref

    k = n // 2 if policy == "local" else n // 2 * L
    scores = torch.randn(L, n, device=DEVICE)
    for _ in range(2):
        sel = topk_indices(scores, k, policy, validate=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel = topk_indices(scores, k, policy, validate=False)
    for seed in range(3):
        scores.copy_(torch.randn(L, n, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed)))
        if seed == 2:
            scores.copy_((scores * 3).round())  # many ties at the threshold
        graph.replay()
        ref = topk_indices_ref(scores, k, policy)
        assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count)
