import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow_kernels import gather_cols_gemv_ref, gather_segments_gemv, gather_segments_gemv_ref

from conftest import DEVICE, DTYPES
from helpers import assert_close_rel, assert_within_dot_bound, only_configs, randn


def ref32(w, x, idx, b=None, count=None, segment=1):
    return gather_segments_gemv_ref(w.float(), x.float(), idx, None if b is None else b.float(), count,
                                    segment=segment)


def columns(heads, segment):
    """The plan's out_rows of these heads: each head's ``segment`` columns in order."""
    h = torch.as_tensor(heads, dtype=torch.int64)
    return (h[:, None] * segment + torch.arange(segment)).reshape(-1).to(device=DEVICE, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 3, 17])
@pytest.mark.parametrize("segment", [16, 5])  # a power of two, and a head size that is none (OPT-2.7B's is 80)
def test_matches_reference(dtype, batch, segment):
    gen = torch.Generator().manual_seed(1)
    N, H = 43, 7  # N not a multiple of any block size
    w = randn(N, H * segment, dtype=dtype, gen=gen)
    b = randn(N, dtype=dtype, gen=gen)
    idx = columns([5, 0, 3, 6], segment)  # unsorted heads
    x = randn(idx.numel(), dtype=dtype, gen=gen) if batch is None else randn(batch, idx.numel(), dtype=dtype, gen=gen)
    out = gather_segments_gemv(w, x, idx, b, segment=segment)
    assert out.dtype == dtype and out.shape == ((N,) if batch is None else (batch, N))
    assert_close_rel(out, ref32(w, x, idx, b, segment=segment), dtype)


@pytest.mark.parametrize("segment", [16, 5])
@pytest.mark.parametrize("live", [5, 4, 1])
def test_two_tiles_ahead_matches_the_reference(segment, live):
    """The batch-1 loop that reads two tiles before the wait (AHEAD 2): more, as many and fewer live segments
    than the two tiles hold (HB 2), with and without preload."""
    from shadow_kernels import gather_segments

    gen = torch.Generator().manual_seed(8)
    N, H = 43, 7
    w = randn(N, H * segment, dtype=torch.float16, gen=gen)
    b = randn(N, dtype=torch.float16, gen=gen)
    idx = columns([5, 0, 3, 6, 2], segment)
    x = randn(idx.numel(), dtype=torch.float16, gen=gen)
    count = torch.tensor([live * segment], dtype=torch.int32, device=DEVICE)
    configs = [c for c in gather_segments._SINGLE_ALL if c.kwargs.get("AHEAD") == 2]
    assert configs
    for cfg in configs:
        with only_configs(gather_segments._segments_single, [cfg]):
            for preload in (False, True):
                got = gather_segments_gemv(w, x, idx, b, count, segment=segment, preload=preload)
                assert_close_rel(got, ref32(w, x, idx, b, count, segment=segment), torch.float16)


@pytest.mark.parametrize("segment", [16, 5])
def test_every_batched_config_matches_the_reference(segment):
    """Each batched config alone (the interpreter's autotuner holds only the first): HB segments a dot with the
    next tile loaded ahead, at HB 1, 2 and 4 (a step past the last live segment masked), and one segment a
    step; a device-side count leaves the last live segments out."""
    from shadow_kernels import gather_segments

    gen = torch.Generator().manual_seed(7)
    N, H = 43, 7
    w = randn(N, H * segment, dtype=torch.float16, gen=gen)
    b = randn(N, dtype=torch.float16, gen=gen)
    idx = columns([5, 0, 3, 6, 2], segment)
    x = randn(3, idx.numel(), dtype=torch.float16, gen=gen)
    count = torch.tensor([3 * segment], dtype=torch.int32, device=DEVICE)
    for cfg in gather_segments._BATCHED_ALL:
        with only_configs(gather_segments._segments_batched, [cfg]):
            for cnt in (None, count):
                got = gather_segments_gemv(w, x, idx, b, cnt, segment=segment)
                assert_close_rel(got, ref32(w, x, idx, b, cnt, segment=segment), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_gather_cols_on_the_transposed_weight(dtype):
    # gather-cols on the transposed weight: the same sum over the same columns.
    gen = torch.Generator().manual_seed(2)
    w = randn(64, 6 * 16, dtype=dtype, gen=gen)
    idx = columns([2, 4, 1], 16)
    x = randn(idx.numel(), dtype=dtype, gen=gen)
    b = randn(64, dtype=dtype, gen=gen)
    want = gather_cols_gemv_ref(w.float().T.contiguous(), x.float(), idx, b.float())
    assert_close_rel(gather_segments_gemv(w, x, idx, b, segment=16), want, dtype)


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("live", [0, 1, 3, 4])
def test_count_uses_only_live_segments(batch, live):
    # Entries past the count are padding: their inputs must not matter (here, huge), and the output is the
    # bias alone when no segment is live.
    gen = torch.Generator().manual_seed(3)
    seg = 8
    w = randn(30, 5 * seg, dtype=torch.float32, gen=gen)
    b = randn(30, dtype=torch.float32, gen=gen)
    idx = columns([4, 1, 0, 2], seg)
    x = randn(idx.numel(), dtype=torch.float32, gen=gen) if batch is None else randn(batch, idx.numel(), gen=gen)
    x[..., live * seg:] = 1e30
    cnt = torch.tensor([live * seg], dtype=torch.int32, device=DEVICE)
    out = gather_segments_gemv(w, x, idx, b, cnt, segment=seg)
    want = ref32(w, x[..., : live * seg], idx[: live * seg], b, segment=seg)
    assert_close_rel(out, want, torch.float32)


def test_empty_index_gives_the_bias():
    w = randn(12, 32, dtype=torch.float32)
    b = randn(12, dtype=torch.float32)
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    assert torch.equal(gather_segments_gemv(w, randn(0, dtype=torch.float32), empty, b, segment=8), b)
    assert torch.equal(gather_segments_gemv(w, randn(3, 0, dtype=torch.float32), empty, segment=8),
                       torch.zeros(3, 12, device=DEVICE))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70),
    heads=st.integers(1, 9),
    segment=st.sampled_from([1, 4, 8, 12, 32]),
    batch=st.sampled_from([None, 1, 2, 9]),
    picks=st.lists(st.integers(0, 10_000), min_size=0, max_size=12),
    use_bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_head_set(n, heads, segment, batch, picks, use_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = randn(n, heads * segment, dtype=dtype, gen=gen)
    idx = columns([p % heads for p in picks], segment)  # repeated heads allowed: each adds its term again
    k = idx.numel()
    x = randn(k, dtype=dtype, gen=gen) if batch is None else randn(batch, k, dtype=dtype, gen=gen)
    b = randn(n, dtype=dtype, gen=gen) if use_bias else None
    out = gather_segments_gemv(w, x, idx, b, segment=segment)
    magnitude = ref32(w.abs(), x.abs(), idx, None if b is None else b.abs(), segment=segment)
    assert_within_dot_bound(out, ref32(w, x, idx, b, segment=segment), magnitude, dtype)


class TestBadInput:
    w = randn(8, 32, dtype=torch.float16)
    idx = columns([1, 3], 8)
    x = randn(16, dtype=torch.float16)

    def test_not_whole_segments(self):
        with pytest.raises(ValueError, match="idx has 15 entries; expected a multiple of segment=8"):
            gather_segments_gemv(self.w, self.x[:15], self.idx[:15], segment=8)

    def test_columns_not_consecutive(self):
        idx = self.idx.clone()
        idx[3] = 30
        with pytest.raises(ValueError, match="runs of 8 consecutive columns"):
            gather_segments_gemv(self.w, self.x, idx, segment=8)

    def test_unaligned_segment(self):
        with pytest.raises(ValueError, match="each starting at a multiple of 8"):
            gather_segments_gemv(self.w, self.x, columns([1, 2], 8) + 1, segment=8)

    def test_out_of_range(self):
        with pytest.raises(ValueError, match=r"idx holds values in \[24, 47\]; expected indices in \[0, 31\]"):
            gather_segments_gemv(self.w, self.x, self.idx + 16, segment=8)

    def test_count_not_whole_segments(self):
        with pytest.raises(ValueError, match="count is 12; expected a multiple of segment=8"):
            gather_segments_gemv(self.w, self.x, self.idx, count=torch.tensor([12], dtype=torch.int32, device=DEVICE),
                                 segment=8)

    def test_count_too_large(self):
        with pytest.raises(ValueError, match="count is 24"):
            gather_segments_gemv(self.w, self.x, self.idx, count=torch.tensor([24], dtype=torch.int32, device=DEVICE),
                                 segment=8)

    @pytest.mark.parametrize("segment", [0, -8, 2.0, True, None])
    def test_bad_segment(self, segment):
        with pytest.raises(ValueError, match="segment must be a positive int"):
            gather_segments_gemv(self.w, self.x, self.idx, segment=segment)

    def test_x_length(self):
        with pytest.raises(ValueError, match="x has 17 entries per row but idx has 16"):
            gather_segments_gemv(self.w, randn(17, dtype=torch.float16), self.idx, segment=8)

    def test_bias_length(self):
        with pytest.raises(ValueError, match="bias has 9 entries; expected 8"):
            gather_segments_gemv(self.w, self.x, self.idx, randn(9, dtype=torch.float16), segment=8)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="x has dtype torch.float32"):
            gather_segments_gemv(self.w, self.x.float(), self.idx, segment=8)

    def test_float_indices(self):
        with pytest.raises(TypeError, match="idx has dtype torch.float32"):
            gather_segments_gemv(self.w, self.x, self.idx.float(), segment=8)

    def test_preload_must_be_a_bool(self):
        with pytest.raises(TypeError, match="preload must be True or False"):
            gather_segments_gemv(self.w, self.x, self.idx, segment=8, preload=1)
