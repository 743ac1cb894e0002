"""The per-position sparse forward (quality evaluation) equals the decode path, for both families."""

import pytest
import torch

from models.generate import Generator
from models.modes import DejaVu, Dense, ShadowLLM, Static
from models.sparse_forward import sparse_logits

from helpers import random_importance, teacher_forced, tiny_decoder

V = 97


def tiny(family):
    return tiny_decoder(family)


CASES = {
    "dense": lambda cfg: Dense(),
    "static-global": lambda cfg: Static(random_importance(cfg), 0.5, "global"),
    "dejavu-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16),
    "dejavu-lookahead-prompt": lambda cfg: DejaVu(0.6, "random", "prompt", lookahead=True, hidden=16),
    "shadowllm-global-token": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16),
    "shadowllm-local-prompt": lambda cfg: ShadowLLM(0.7, "random", "local", "prompt", hidden=16),
    "shadowllm-fp8-token": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16, predictor_dtype="fp8"),
    "dejavu-fp8-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16, predictor_dtype="fp8"),
}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_equals_teacher_forced_decoding(family, case):
    model = tiny(family)
    mode = CASES[case](model.cfg)
    tokens = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))
    start = 5
    want = []
    for b in range(2):  # the decode path, one sequence at a time (batch 1)
        gen = Generator(model, mode, batch=1, max_len=11, backend="torch")
        steps = teacher_forced(gen, tokens[b:b + 1], start)[:, 0]  # positions start .. 10
        want.append(torch.cat([gen.model.prefill(tokens[b:b + 1, :start]), steps]))
    want = torch.stack(want)  # [2, 7, V]: positions start-1 .. 10
    mode.bind(model)
    got = sparse_logits(model, tokens, mode, start)
    assert rel(got[:, start - 1:], want) <= 1e-4
    if case != "dense":  # and it is not the dense forward
        assert rel(got[:, start:], model.prefill(tokens, all_logits=True)[:, start:]) > 1e-3
    # one start per sequence: each row is what it is alone
    starts = torch.tensor([start, start + 2])
    per_row = sparse_logits(model, tokens, mode, starts)
    assert rel(per_row[0], got[0]) <= 1e-6
    assert rel(per_row[1], sparse_logits(model, tokens[1:], mode, start + 2)[0]) <= 1e-6


def test_bad_arguments():
    model = tiny("opt")
    mode = Dense()
    tokens = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="bind the mode"):
        sparse_logits(model, tokens, mode, 2)
    mode.bind(model)
    with pytest.raises(ValueError, match="sparse_from must be an int in \\[1, 6\\]"):
        sparse_logits(model, tokens, mode, 0)
    with pytest.raises(ValueError, match="sparse_from has 2 entries for 1 sequences"):
        sparse_logits(model, tokens, mode, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown hook sites"):
        model.prefill(tokens, hooks={"nope": lambda i, x: x})
