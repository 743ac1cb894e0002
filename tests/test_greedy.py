import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow_kernels import greedy_next, greedy_next_ref

from conftest import DEVICE, DTYPES


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), V=st.sampled_from([1, 7, 2047, 2048, 2049, 5000]), dtype=st.sampled_from(DTYPES),
       ties=st.booleans(), seed=st.integers(0, 99))
def test_matches_torch_argmax_and_advances_pos(B, V, dtype, ties, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g)
    if ties:  # the maximum repeated, across block boundaries too: the lowest index wins
        x = (x * 2).round()
    logits = x.to(DEVICE, dtype)
    tok = torch.full((B,), -1, dtype=torch.long, device=DEVICE)
    pos = torch.tensor([41], device=DEVICE)
    out = greedy_next(logits, tok, pos)
    assert out is tok
    assert torch.equal(tok.cpu(), logits.float().argmax(dim=-1).cpu())
    assert int(pos) == 42
    tok32 = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    greedy_next(logits, tok32)  # no pos: only the token
    assert torch.equal(tok32.cpu().long(), tok.cpu())
    ref_tok, ref_pos = torch.zeros_like(tok), torch.tensor([41], device=DEVICE)
    greedy_next_ref(logits, ref_tok, ref_pos)
    assert torch.equal(ref_tok, tok) and int(ref_pos) == 42


def test_special_values():
    V = 4100
    x = torch.zeros(4, V)
    x[0] = float("-inf")  # all -inf: index 0, as torch.argmax
    x[1, 3000] = float("inf")
    x[1, 3500] = float("inf")  # two +inf: the first
    x[2, 2500] = float("nan")  # a NaN counts as +inf
    x[3, :] = -5.0
    x[3, 4099] = 1.0  # the last entry of a partial block
    tok = torch.zeros(4, dtype=torch.long, device=DEVICE)
    greedy_next(x.to(DEVICE), tok)
    assert tok.cpu().tolist() == [0, 3000, 2500, 4099]
    ref = torch.zeros_like(tok)
    greedy_next_ref(x.to(DEVICE), ref)
    assert torch.equal(ref, tok)


def test_bad_input():
    logits = torch.randn(2, 10, device=DEVICE)
    tok = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="tok must be an int32/int64 tensor of shape"):
        greedy_next(logits, tok.float())
    with pytest.raises(TypeError, match="tok must be"):
        greedy_next(logits, tok[:1])
    with pytest.raises(TypeError, match="pos must be a one-element"):
        greedy_next(logits, tok, torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        greedy_next(logits[0], tok)
    with pytest.raises(TypeError, match="logits has dtype"):
        greedy_next(logits.long(), tok)
    with pytest.raises(ValueError, match="no entries"):
        greedy_next(logits[:, :0], tok)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        greedy_next(torch.randn(10, 2, device=DEVICE).T, tok)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,E", [(1, 64), (3, 2500)])
def test_embed_add_matches_reference(dtype, B, E):
    from shadow_kernels import embed_add, embed_add_ref

    g = torch.Generator().manual_seed(B + E)
    table = torch.randn(50, E, generator=g).to(DEVICE, dtype)
    ptable = torch.randn(20, E, generator=g).to(DEVICE, dtype)
    tokens = torch.randint(0, 50, (B,), generator=g).to(DEVICE)
    pos = torch.tensor([7], device=DEVICE)
    out = embed_add(tokens, table, pos, ptable, 2)
    want = (table[tokens.long()].float() + ptable[9].float()).to(dtype)
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":  # the interpreter truncates bf16 stores: one ulp
        torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, want)
    assert torch.equal(embed_add_ref(tokens, table, pos, ptable, 2), want)
    with pytest.raises(TypeError, match="tokens must be a 1-D int32/int64"):
        embed_add(tokens.float(), table, pos, ptable)
    with pytest.raises(ValueError, match="pos_table has 3 features"):
        embed_add(tokens, table, pos, ptable[:, :3])
    with pytest.raises(TypeError, match="offset must be an int"):
        embed_add(tokens, table, pos, ptable, 2.0)
