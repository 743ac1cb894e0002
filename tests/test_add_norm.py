import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow_kernels.add_norm import add_layernorm, add_layernorm_ref, add_rmsnorm, add_rmsnorm_ref

from conftest import DEVICE, DTYPES, REL_TOL
from helpers import randn, rel_err


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), N=st.integers(1, 300), dtype=st.sampled_from(DTYPES), res=st.booleans(),
       seed=st.integers(0, 99), rms=st.booleans())
def test_matches_reference(B, N, dtype, res, seed, rms):
    g = torch.Generator().manual_seed(seed)
    x = randn(B, N, dtype=dtype, gen=g, scale=3.0)
    r = randn(B, N, dtype=dtype, gen=g) if res else None
    w, b = randn(N, dtype=dtype, gen=g), randn(N, dtype=dtype, gen=g)
    if rms:
        s, y = add_rmsnorm(x, r, w)
        s_ref, y_ref = add_rmsnorm_ref(x, r, w)
    else:
        s, y = add_layernorm(x, r, w, b)
        s_ref, y_ref = add_layernorm_ref(x, r, w, b)
    if dtype == torch.bfloat16:  # the interpreter truncates bf16 stores: one ulp
        assert torch.allclose(s.float(), s_ref.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(s, s_ref)  # the rounded sum, bit for bit
    if N > 1 or rms:
        assert rel_err(y, y_ref) <= 2 * REL_TOL[dtype]


def test_bad_inputs():
    x = randn(2, 8)
    w = randn(8)
    with pytest.raises(ValueError, match="residual has shape"):
        add_layernorm(x, randn(2, 7), w, w)
    with pytest.raises(ValueError, match="weight has 7 entries"):
        add_layernorm(x, None, randn(7), w)
    with pytest.raises(TypeError, match="must match"):
        add_layernorm(x, None, w.half(), w)
    with pytest.raises(ValueError, match="must be 2-D"):
        add_layernorm(randn(8), None, w, w)
    assert DEVICE.type in ("cpu", "cuda")
