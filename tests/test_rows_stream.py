"""The v12 streaming row kernel (``gather_rows._rows_stream_kernel``): a fixed grid whose programs each walk an
equal share of whole row blocks as one flat loop, prefetching across block boundaries.

The interpreter's SM count is 4, so a config with OCC 1 runs 4 programs: each then owns many blocks, and every
boundary case of the flat loop (the next block's rows, bias and rowsum read a block ahead; a program with one
block more than another; programs with no block; blocks past the device-side count) is exercised on small shapes.
"""

import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow_kernels import fold_norm, gather_rows, gather_rows_gemv, gather_rows_gemv_ref, norm_rows_gemv
from shadow_kernels.gather_rows import launch_rows_gemv, set_rows_stream

from conftest import DEVICE, DTYPES
from helpers import assert_close_rel, assert_within_dot_bound, only_configs, randn

# (BLOCK_N, BLOCK_K, OCC): few programs with many blocks each; one row a block; K pieces of every size
SHAPES = [(2, 64, 1), (1, 128, 2), (4, 32, 1), (8, 256, 4)]


def config(block_n, block_k, occ):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "OCC": occ}, num_warps=4, num_stages=1)


@pytest.fixture(params=SHAPES, ids=lambda s: f"n{s[0]}-k{s[1]}-occ{s[2]}")
def stream_config(request):
    prev = set_rows_stream(True)
    try:
        with only_configs(gather_rows._rows_stream, [config(*request.param)]):
            yield request.param
    finally:
        set_rows_stream(prev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("live", [None, 0, 1, 23, 61])
def test_gather_matches_reference(stream_config, dtype, live):
    gen = torch.Generator().manual_seed(11)
    N, K = 200, 300  # K not a multiple of any piece: the last piece of every block is partial
    w = randn(N, K, dtype=dtype, gen=gen)
    x = randn(K, dtype=dtype, gen=gen)
    b = randn(N, dtype=dtype, gen=gen)
    idx = torch.randperm(N, generator=gen)[:61].to(DEVICE, torch.int32)
    idx[5] = idx[40]  # a duplicate
    count = None if live is None else torch.tensor([live], dtype=torch.int32, device=DEVICE)
    y = gather_rows_gemv(w, x, idx, b, "relu", count=count)
    assert y.shape == (61,)
    assert_close_rel(y, gather_rows_gemv_ref(w, x, idx, b, "relu", count=count), dtype)
    if live is not None:
        assert torch.all(y[live:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_rows_without_bias(stream_config, dtype):
    """``idx=None`` (the decoder's own dense GEMV): every row in order."""
    gen = torch.Generator().manual_seed(12)
    w = randn(77, 130, dtype=dtype, gen=gen)
    x = randn(1, 130, dtype=dtype, gen=gen)
    y = launch_rows_gemv(w, x, None, None, None, False, dtype)
    assert_close_rel(y, (x.float() @ w.float().T), dtype)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("live", [None, 0, 9])
@pytest.mark.parametrize("rows", ["gather", "all"])
def test_norm_fold_and_residual(stream_config, kind, live, rows):
    """The norm's statistics come from each program's first block, and program 0 writes z = x + r (with no live
    row too); later blocks use the finished statistics."""
    gen = torch.Generator().manual_seed(13)
    N, K = 90, 200
    w = randn(N, K, gen=gen, scale=0.2)
    g = 1.0 + 0.3 * randn(K, gen=gen)
    beta = randn(K, gen=gen, scale=0.3) if kind == "layer" else None
    bias = randn(N, gen=gen)
    fold = fold_norm(w, g, beta, bias, kind=kind, eps=1e-5)
    x = randn(K, gen=gen, scale=2.0) + 0.7
    r = randn(K, gen=gen)
    idx = torch.randperm(N, generator=gen)[:40].to(DEVICE, torch.int32) if rows == "gather" else None
    count = None if live is None or idx is None else torch.tensor([live], dtype=torch.int32, device=DEVICE)
    y, z = norm_rows_gemv(w, x, idx, fold, r, "relu", count=count)
    assert torch.equal(z, x + r)
    zf = (x + r).float()
    if kind == "layer":
        a = torch.nn.functional.layer_norm(zf, (K,), g, beta, 1e-5)
    else:
        a = zf * torch.rsqrt(zf.pow(2).mean() + 1e-5) * g
    sel = torch.arange(N, device=DEVICE) if idx is None else idx.long()
    want = torch.relu(a @ w[sel].T + bias[sel])
    mag = a.abs() @ w[sel].abs().T + bias[sel].abs()
    n = y.shape[0] if count is None else live
    assert_within_dot_bound(y[:n], want[:n], mag[:n], torch.float32)
    assert torch.all(y[n:] == 0)


def test_same_result_as_the_one_block_kernel():
    """fp32: the streaming kernel and the v7-v11 kernel agree to fp32 rounding on the same call."""
    gen = torch.Generator().manual_seed(14)
    w = randn(300, 520, gen=gen)
    x = randn(520, gen=gen)
    b = randn(300, gen=gen)
    idx = torch.randperm(300, generator=gen)[:150].to(DEVICE, torch.int32)
    prev = set_rows_stream(True)
    try:
        new = gather_rows_gemv(w, x, idx, b)
        set_rows_stream(False)
        old = gather_rows_gemv(w, x, idx, b)
    finally:
        set_rows_stream(prev)
    mag = (x.abs() @ w[idx.long()].abs().T) + b[idx.long()].abs()
    assert torch.all((new - old).abs() <= 1e-5 * mag)


def test_switch_takes_a_bool():
    with pytest.raises(TypeError, match="set_rows_stream takes True or False"):
        set_rows_stream(1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 120), k=st.integers(1, 300), picks=st.integers(0, 150), live=st.integers(0, 150),
       shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_property_any_shape(n, k, picks, live, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    w = randn(n, k, gen=gen)
    x = randn(k, gen=gen)
    idx = torch.randint(0, n, (picks,), generator=gen).to(DEVICE, torch.int32)
    count = torch.tensor([min(live, picks)], dtype=torch.int32, device=DEVICE)
    prev = set_rows_stream(True)
    try:
        with only_configs(gather_rows._rows_stream, [config(*shape)]):
            y = gather_rows_gemv(w, x, idx, None, count=count)
    finally:
        set_rows_stream(prev)
    want = gather_rows_gemv_ref(w, x, idx, None, count=count)
    mag = x.abs() @ w[idx.long()].abs().T
    assert_within_dot_bound(y, want, mag, torch.float32)
