"""Tests that need a CUDA device: real layer shapes, and capture of a sparse step in a CUDA graph."""

import pytest
import torch

from shadow_kernels import (
    fused_predictor,
    fused_predictor_ref,
    gather_cols_gemv,
    gather_rows_gemv,
    topk_indices,
)

from conftest import DEVICE
from helpers import assert_close_rel, randn

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
