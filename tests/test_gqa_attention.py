import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow_kernels.gqa_attention import gqa_decode_attention, gqa_decode_attention_ref

from conftest import DEVICE, DTYPES, REL_TOL
from helpers import rel_err


def rope_tables(max_pos, D, theta=500.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    emb = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), KVH=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]), T=st.integers(1, 70),
       D=st.sampled_from([8, 16]), dtype=st.sampled_from(DTYPES), chunk=st.sampled_from([None, 16]), data=st.data())
def test_matches_reference(B, KVH, G, T, D, dtype, chunk, data):
    pos = data.draw(st.integers(0, T - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    kc = torch.randn(B, KVH, T, D, generator=g).to(DEVICE, dtype)
    vc = torch.randn(B, KVH, T, D, generator=g).to(DEVICE, dtype)
    valid = (torch.rand(B, KVH, T, generator=g) < 0.8).to(DEVICE, torch.uint8)
    qkv = torch.randn(B, KVH * (G + 2) * D, generator=g).to(DEVICE, dtype)
    cos, sin = rope_tables(T + 4, D)
    p = torch.tensor([pos], device=DEVICE)
    a = [kc.clone(), vc.clone(), valid.clone()]
    b = [kc.clone(), vc.clone(), valid.clone()]
    out = gqa_decode_attention(qkv, *a, p, cos, sin, chunk=chunk)
    ref = gqa_decode_attention_ref(qkv, *b, p, cos, sin)
    assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1])
    tol = 4 * REL_TOL[dtype] if dtype != torch.float32 else 1e-5  # the rotated key is rounded once either way
    assert rel_err(a[0], b[0]) <= tol
    assert rel_err(out, ref) <= 2 * tol


def test_bad_inputs():
    kc = torch.zeros(1, 2, 8, 8, device=DEVICE)
    cos, sin = rope_tables(8, 8)
    valid = torch.zeros(1, 2, 8, dtype=torch.uint8, device=DEVICE)
    pos = torch.tensor([3], device=DEVICE)
    with pytest.raises(ValueError, match="qkv has shape"):
        gqa_decode_attention(torch.zeros(1, 2 * 8, device=DEVICE), kc, kc.clone(), valid, pos, cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        gqa_decode_attention(torch.zeros(1, 2 * 3 * 8, device=DEVICE), kc, kc.clone(), valid, pos, cos[:, :4], sin)
