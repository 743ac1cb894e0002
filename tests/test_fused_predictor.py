import pytest
import torch

from shadow_kernels import fused_predictor, fused_predictor_ref

from conftest import (
    DEVICE,
    DTYPES,
    REL_TOL,  # noqa: E402
)
from helpers import assert_close_rel, randn, rel_err


def make(E, H, O, dtype, gen, bias=True):
    w1 = randn(H, E, dtype=dtype, gen=gen, scale=E**-0.5)
    w2 = randn(O, H, dtype=dtype, gen=gen, scale=H**-0.5)
    b1 = randn(H, dtype=dtype, gen=gen) if bias else None
    b2 = randn(O, dtype=dtype, gen=gen) if bias else None
    return w1, b1, w2, b2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 5, 20])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, batch, bias):
    gen = torch.Generator().manual_seed(0)
    E, H, O = 96, 72, 130
    w1, b1, w2, b2 = make(E, H, O, dtype, gen, bias)
    x = randn(E, dtype=dtype, gen=gen) if batch is None else randn(batch, E, dtype=dtype, gen=gen)
    out = fused_predictor(x, w1, b1, w2, b2)
    assert out.dtype == torch.float32
    assert out.shape == ((O,) if batch is None else (batch, O))
    # The hidden layer stays fp32 for one token; the batched path rounds it to the weight dtype
    # for the tensor-core dot, which is the dtype's own tolerance again.
    assert_close_rel(out, fused_predictor_ref(x, w1, b1, w2, b2), dtype)


def test_relu_is_applied_to_the_hidden_layer():
    E, H, O = 8, 4, 3
    w1 = torch.eye(H, E, dtype=torch.float32, device=DEVICE)
    w2 = torch.ones(O, H, dtype=torch.float32, device=DEVICE)
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0, 0, 0, 0], device=DEVICE)
    out = fused_predictor(x, w1, None, w2, None)
    assert torch.allclose(out.cpu(), torch.full((O,), 4.0))  # 1 + 3, the negatives cut off


class TestBadInput:
    gen = torch.Generator().manual_seed(1)
    w1, b1, w2, b2 = make(16, 8, 10, torch.float16, gen)
    x = randn(16, dtype=torch.float16)

    def test_hidden_mismatch(self):
        with pytest.raises(ValueError, match=r"w2 is \[10, 7\] but the hidden layer has 8 units"):
            fused_predictor(self.x, self.w1, self.b1, self.w2[:, :7].contiguous(), self.b2)

    def test_input_width(self):
        with pytest.raises(ValueError, match="x has 15 features but w1 is"):
            fused_predictor(self.x[:15], self.w1, self.b1, self.w2, self.b2)

    def test_bias_length(self):
        with pytest.raises(ValueError, match="b2 has 9 entries; expected 10"):
            fused_predictor(self.x, self.w1, self.b1, self.w2, self.b2[:9])

    def test_mixed_dtypes(self):
        with pytest.raises(TypeError, match="w2 has dtype torch.float32"):
            fused_predictor(self.x, self.w1, self.b1, self.w2.float(), self.b2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 3])
def test_sparse_hidden_predictor_matches_reference(dtype, batch):
    from shadow_kernels import sparse_hidden_predictor, sparse_hidden_predictor_ref

    g = torch.Generator().manual_seed(batch or 0)
    E, Hd, O = 24, 40, 70
    x = randn(*((batch, E) if batch else (E,)), dtype=dtype, gen=g)
    w1, b1 = randn(Hd, E, dtype=dtype, gen=g, scale=0.3), randn(Hd, dtype=dtype, gen=g)
    b1[:10] = -100.0  # these hidden units are dead for every input
    w2t, b2 = randn(Hd, O, dtype=dtype, gen=g, scale=0.3), randn(O, dtype=dtype, gen=g)
    out, live = sparse_hidden_predictor(x, w1, b1, w2t, b2, return_live=True)
    ref, live_ref = sparse_hidden_predictor_ref(x, w1, b1, w2t, b2, return_live=True)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) <= REL_TOL[dtype]
    assert int(live) == int(live_ref) <= Hd - 10
    with pytest.raises(ValueError, match="w2t is"):
        sparse_hidden_predictor(x, w1, b1, w2t.T.contiguous(), b2)


def test_fp8_second_layer_reference_and_errors():
    """quantize_rows_fp8: one scale per row, |w - q * s| within e4m3's rounding (2^-4 of the row's
    largest magnitude at most); the reference with the scale equals a dequantised fp32 run; bad scales
    and a scale for a non-fp8 weight are errors that say what is expected."""
    from shadow_kernels import quantize_rows_fp8

    gen = torch.Generator().manual_seed(2)
    w1, b1 = torch.randn(16, 8, generator=gen), torch.randn(16, generator=gen)
    w2, b2 = torch.randn(40, 16, generator=gen), torch.randn(40, generator=gen)
    q, scale = quantize_rows_fp8(w2)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (40,)
    q7, scale7 = quantize_rows_fp8(w2, chunk_rows=7)  # chunked: the same result
    assert torch.equal(q7.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale7, scale)
    deq = q.float() * scale[:, None]
    assert ((deq - w2).abs() <= w2.abs().amax(dim=1, keepdim=True) * 2**-4 + 1e-12).all()
    x = torch.randn(3, 8, generator=gen)
    got = fused_predictor_ref(x, w1, b1, q, b2, w2_scale=scale)
    torch.testing.assert_close(got, fused_predictor_ref(x, w1, b1, deq, b2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="w2_scale must be a float32 tensor \\[40\\]"):
        fused_predictor_ref(x, w1, b1, q, b2)
    with pytest.raises(ValueError, match="only for float8_e4m3fn"):
        fused_predictor_ref(x, w1, b1, w2, b2, w2_scale=scale)
