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
    "dejavu-layer-input-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16, neuron_input="layer"),
    "dejavu-lookahead-prompt": lambda cfg: DejaVu(0.6, "random", "prompt", lookahead=True, hidden=16),
    "shadowllm-global-token": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16),
    "shadowllm-local-prompt": lambda cfg: ShadowLLM(0.7, "random", "local", "prompt", hidden=16),
    # the one predictor on layer 1's input (the residual stream after layer 0) instead of layer 0's attention output
    "shadowllm-residual-token": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16,
                                                      input_site="residual"),
    "shadowllm-residual-prompt": lambda cfg: ShadowLLM(0.6, "random", "local", "prompt", hidden=16,
                                                       input_site="residual"),
    "shadowllm-fp8-token": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16, predictor_dtype="fp8"),
    "dejavu-fp8-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16, predictor_dtype="fp8"),
    # a kind without a budget takes the dense path, and DejaVu runs no net for it
    "static-heads-only": lambda cfg: Static(random_importance(cfg), 0.5, "global").set_budgets(0.5, 0.0),
    "dejavu-heads-only-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16).set_budgets(0.5, 0.0),
    "dejavu-neurons-only-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16).set_budgets(0.0, 0.5),
    "dejavu-layer-input-heads-only": lambda cfg: DejaVu(0.5, "random", "token", hidden=16,
                                                        neuron_input="layer").set_budgets(0.5, 0.0),
    "shadowllm-neurons-only-token": lambda cfg: ShadowLLM(0.5, "random", "local", "token",
                                                          hidden=16).set_budgets(0.0, 0.6),
    # a staged predictor: a second net on the residual stream entering layer 2 scores layers 2.. (plans per stage)
    "shadowllm-staged-token": lambda cfg: ShadowLLM(0.5, "random", "local", "token", hidden=16, input_site="residual",
                                                    stages=(1, 2)),
    "shadowllm-staged-prompt": lambda cfg: ShadowLLM(0.6, "random", "local", "prompt", hidden=16,
                                                     input_site="residual", stages=(1, 2)),
    # every group's key and value computed and cached (decodes on grouped-query models only)
    "static-global-kv-always": lambda cfg: Static(random_importance(cfg), 0.7, "global").set_kv_rule("always"),
    "shadowllm-local-token-kv-always": lambda cfg: ShadowLLM(0.7, "random", "local", "token",
                                                             hidden=16).set_kv_rule("always"),
}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_equals_teacher_forced_decoding(family, case):
    if family == "opt" and case.endswith("kv-always"):
        pytest.skip("OPT decodes with kv_rule 'skip' only")
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


def _brute_force_oracle(model, tokens, start, sparsity, policy, kv_rule, first=1, neuron_thresholds=None,
                        criterion="l2norm"):
    """The oracle by hand: a dense pass records every head's output and every activation (``plainact``: times its
    gradient, through zero probes added at each site, of the summed next-token loss); per position, python loops
    keep the units of largest norm (ties to the lower index), or with ``neuron_thresholds`` (one per sparse layer)
    the neurons whose score passes their layer's; a masked pass applies the choices."""
    from models.plan import kept_units

    cfg = model.cfg
    H, F, L = cfg.n_heads, cfg.ffn, cfg.n_layers
    heads, acts, probes = {}, {}, {}

    def rec(store, key):
        def f(i, t):
            store[i] = t.detach().clone()
            if criterion != "plainact":
                return t
            probes[(key, i)] = p = torch.zeros_like(t, requires_grad=True)
            return t + p
        return f

    with torch.enable_grad():
        logits = model.prefill(tokens, all_logits=True, hooks={"heads": rec(heads, "h"), "neurons": rec(acts, "f")})
        if criterion == "plainact":
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            loss = -logp.gather(-1, tokens[:, 1:, None]).sum()
            loss.backward()
            for i in range(L):  # |A * dL/dA|, summed over a head's output
                heads[i] = (heads[i] * probes[("h", i)].grad).abs()
                heads[i] = heads[i].sum(-1, keepdim=True)  # norm() of a one-wide last dim is its value
                acts[i] = acts[i] * probes[("f", i)].grad
    B, P = tokens.shape
    hmask = {i: torch.ones(B, P, H, dtype=torch.bool) for i in range(L)}
    nmask = {i: torch.ones(B, P, F, dtype=torch.bool) for i in range(L)}
    layers = list(range(first, L))
    kh, kn = kept_units(H, sparsity), kept_units(F, sparsity)
    for b in range(B):
        for t in range(start, P):
            hs = {i: [float(heads[i][b, j, t].norm()) for j in range(H)] for i in layers}
            ns = {i: [float(acts[i][b, t, j].abs()) for j in range(F)] for i in layers}
            for scores, mask, k in ((hs, hmask, kh), (ns, nmask, kn)):
                if neuron_thresholds is not None and mask is nmask:
                    for i in layers:
                        mask[i][b, t] = torch.tensor(scores[i]) > float(neuron_thresholds[i - first])
                elif policy == "local":
                    for i in layers:
                        keep = sorted(range(len(scores[i])), key=lambda j: (-scores[i][j], j))[:k]
                        mask[i][b, t] = False
                        mask[i][b, t, keep] = True
                else:
                    units = [(i, j) for i in layers for j in range(len(scores[i]))]
                    keep = sorted(units, key=lambda u: (-scores[u[0]][u[1]], u))[: k * len(layers)]
                    for i in layers:
                        mask[i][b, t] = False
                    for i, j in keep:
                        mask[i][b, t, j] = True
    kvh = model.plan_kv_heads or H

    def kv_live(i):
        if kv_rule == "always":
            return None
        m = hmask[i]
        return m.view(B, P, kvh, H // kvh).any(dim=3).transpose(1, 2)

    hooks = {"heads": lambda i, h: h * hmask[i].transpose(1, 2)[..., None].to(h.dtype),
             "neurons": lambda i, f: f * nmask[i].to(f.dtype), "kv_live": kv_live}
    return model.prefill(tokens, all_logits=True, hooks=hooks), hmask


@pytest.mark.parametrize("policy", ["local", "global"])
@pytest.mark.parametrize("kv_rule", ["skip", "always"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_oracle_equals_a_brute_force_masked_forward(family, policy, kv_rule):
    from models.modes import make_mode

    model = tiny(family)
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    mode = make_mode("oracle", sparsity=0.5, policy=policy, kv_rule=kv_rule).bind(model)
    got = sparse_logits(model, tokens, mode, 4)
    want, hmask = _brute_force_oracle(model, tokens, 4, 0.5, policy, kv_rule)
    assert rel(got, want) <= 1e-5
    assert rel(got[:, 4:], model.prefill(tokens, all_logits=True)[:, 4:]) > 1e-3  # it is not the dense forward
    if policy == "global":  # a global budget lets layers keep different numbers of heads
        kept = torch.stack([hmask[i][:, 4:].sum(-1) for i in range(1, model.cfg.n_layers)])
        assert kept.sum(0).eq(kept.sum(0)[0, 0]).all()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_plainact_oracle_equals_a_brute_force_masked_forward(family):
    """The gradient-criterion oracle: per position, the heads and neurons of largest |A * dL/dA| (L: the summed
    next-token loss of the tokens scored, from one backward pass), as by hand with autograd; it chooses otherwise
    than the l2norm oracle; quality sweeps run it for --criteria plainact (l2norm where no criterion of its own is
    asked for)."""
    from bench.quality import quality_cases
    from models.modes import make_mode

    model = tiny(family)
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    mode = make_mode("oracle", sparsity=0.5, policy="local", oracle_criterion="plainact").bind(model)
    got = sparse_logits(model, tokens, mode, 4)
    want, _ = _brute_force_oracle(model, tokens, 4, 0.5, "local", "skip", criterion="plainact")
    assert rel(got, want) <= 1e-5
    norms = sparse_logits(model, tokens, make_mode("oracle", sparsity=0.5, policy="local").bind(model), 4)
    assert rel(got, norms) > 1e-4
    with pytest.raises(ValueError, match="the oracle's criterion must be one of"):
        make_mode("oracle", oracle_criterion="fisher")
    cases = quality_cases(["oracle"], ["plainact", "fisher", "l2norm"], [0.5], ["local"])
    assert [c.criterion for c in cases] == ["plainact", "l2norm"]
    assert [c.criterion for c in quality_cases(["oracle"], ["fisher"], [0.5], ["local"])] == ["l2norm"]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_oracle_with_the_neuron_threshold_rule_equals_a_brute_force_masked_forward(family):
    """The per-token-count ceiling: the oracle under neuron_rule 'threshold' keeps each position's neurons whose dense
    |activation| passes their layer's threshold (calibrated on other text to keep about half), heads by top-k, as a
    masked forward by hand does; the count varies per token, and it is not the fixed-count oracle."""
    from models.modes import make_mode
    from models.sparse_forward import PositionPlans, calibrate_neuron_thresholds, oracle_scores

    model = tiny(family)
    mode = make_mode("oracle", sparsity=0.5, policy="local", neuron_rule="threshold").bind(model)
    g = torch.Generator().manual_seed(7)
    t = calibrate_neuron_thresholds(model, mode, [torch.randint(0, V, (30,), generator=g).tolist() for _ in range(4)])
    assert t.shape == (model.cfg.n_layers - 1,) and bool((t >= 0).all())  # OPT's ReLU: over half are exact zeros
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    got = sparse_logits(model, tokens, mode, 4)
    want, _ = _brute_force_oracle(model, tokens, 4, 0.5, "local", "skip", neuron_thresholds=t)
    assert rel(got, want) <= 1e-5
    topk = sparse_logits(model, tokens, make_mode("oracle", sparsity=0.5, policy="local").bind(model), 4)
    assert rel(got, topk) > 1e-4
    plans = PositionPlans(model, mode, 4, 9, 2)
    plans.set_oracle(*oracle_scores(model, tokens))
    kept = torch.stack([plans.neuron_masks[i][:, 4:].float().sum(-1) for i in range(1, model.cfg.n_layers)])
    assert int(kept.max()) > int(kept.min())
    if family == "llama":  # SiLU: no ties, so about half passes (with ReLU a zero never passes)
        assert 0.2 < float(kept.mean()) / model.cfg.ffn < 0.8
    with pytest.raises(ValueError, match="needs policy 'local'"):
        make_mode("oracle", sparsity=0.5, policy="global", neuron_rule="threshold").bind(model)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_kv_rule_always_keeps_every_key_and_value(family):
    """With kv_rule 'always' a skipped head still leaves its key and value, so later positions that compute it see
    more context than under 'skip' and the logits differ (per-token plans: a static plan skips a head at every
    position, where the rule cannot matter); for a dense mode the rule changes nothing."""
    from models.modes import make_mode

    model = tiny(family)
    tokens = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(6))
    skip = make_mode("oracle", sparsity=0.6, policy="local").bind(model)
    always = make_mode("oracle", sparsity=0.6, policy="local", kv_rule="always").bind(model)
    assert rel(sparse_logits(model, tokens, skip, 3), sparse_logits(model, tokens, always, 3)) > 1e-4
    dense = make_mode("dense", kv_rule="always").bind(model)
    assert torch.equal(sparse_logits(model, tokens, dense, 3), sparse_logits(model, tokens, Dense().bind(model), 3))


def test_separate_head_and_neuron_budgets():
    from models.modes import make_mode
    from models.plan import kept_units

    model = tiny("llama")
    cfg = model.cfg
    mode = make_mode("shadowllm", sparsity=0.5, predictor="random", policy="local", head_sparsity=0.0,
                     neuron_sparsity=0.75).bind(model)
    assert mode.buffers.k_heads == cfg.n_heads and mode.buffers.k_neurons == kept_units(cfg.ffn, 0.75)
    assert mode.budgets() == {"head_sparsity": 0.0, "neuron_sparsity": 0.75, "kv_rule": "skip"}
    tokens = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(1))
    heads_only = make_mode("shadowllm", sparsity=0.5, predictor=mode.predictor, policy="local",
                           neuron_sparsity=0.0).bind(model)
    neurons_only = make_mode("shadowllm", sparsity=0.5, predictor=mode.predictor, policy="local",
                             head_sparsity=0.0).bind(model)
    a, b = sparse_logits(model, tokens, heads_only, 3), sparse_logits(model, tokens, neurons_only, 3)
    assert rel(a, b) > 1e-3
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        make_mode("static", importance=random_importance(cfg), head_sparsity=1.0)


def test_the_oracle_and_kv_rule_always_have_no_decode_step():
    from models.modes import make_mode

    model = tiny("opt")
    with pytest.raises(ValueError, match="has no decode step"):
        Generator(model, make_mode("oracle", sparsity=0.5), max_len=8, backend="torch")
    with pytest.raises(ValueError, match="decodes on grouped-query models"):
        Generator(model, make_mode("static", sparsity=0.5, importance=random_importance(model.cfg),
                                   kv_rule="always"), max_len=8, backend="torch")


def test_kv_rule_always_keeps_every_group_in_the_decode_plan():
    """Llama: under "always" every group's key and value rows are in the Q/K/V gather and every group is cached at
    each step, while the kept queries are those of "skip"; the step reads the extra key/value rows."""
    from models.modes import make_mode

    model = tiny("llama")  # 4 heads in 2 groups
    imp = random_importance(model.cfg)
    imp["heads"][1:] = torch.tensor([1.0, 0.9, 0.0, 0.1])  # keep both heads of group 0, none of group 1
    plans = {}
    for rule in ("skip", "always"):
        mode = make_mode("static", sparsity=0.5, policy="local", importance=imp, kv_rule=rule)
        gen = Generator(model, mode, max_len=12, backend="torch")
        gen.generate(torch.tensor([[5, 6, 7]]), 4)
        plans[rule] = (mode.plan(2), mode.live_counts(), gen.cache.valid[2, 0, :, 3:6].clone())
    skip, always = plans["skip"], plans["always"]
    assert torch.equal(skip[0].q_unit >= 0, always[0].q_unit >= 0)
    assert (skip[0].kv_unit >= 0).tolist() == [True, False] and (always[0].kv_unit >= 0).tolist() == [True, True]
    assert int(always[0].qkv_count) == int(skip[0].qkv_count) + 2 * model.cfg.head_dim
    assert skip[2][1].tolist() == [0, 0, 0] and always[2][1].tolist() == [1, 1, 1]  # group 1 cached each step
    groups = lambda c: c["kv_groups"]
    assert groups(always[1]) == [2, 2, 2] and groups(skip[1]) == [1, 1, 1]
    bytes_ = lambda c: model.step_weight_bytes(c["heads"], c["neurons"], 1, c["kv_groups"])
    assert bytes_(always[1]) - bytes_(skip[1]) == 3 * 2 * model.cfg.head_dim * model.cfg.hidden * 4


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_threshold_mode_equals_a_masked_dense_forward(family):
    """Each projection of a sparse layer drops the input entries below its layer's threshold, at sparse positions
    only; checked against masks written out here, and against the calibrated sparsity on the calibration text."""
    from models.modes import make_mode
    from models.threshold import SITES, calibrate

    model = tiny(family)
    cfg = model.cfg
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(8))
    table = calibrate(model, tokens.tolist(), [0.4])[0.4]
    assert set(table) == set(SITES) and all(t.shape == (cfg.n_layers,) for t in table.values())
    mode = make_mode("threshold", sparsity=0.4, importance=table).bind(model)
    got = sparse_logits(model, tokens, mode, 3)
    dropped = {s: [] for s in SITES}

    def cut(site, dim):
        def hook(i, t):
            if i < 1:
                return t
            keep = t.abs() > table[site][i]
            pos = torch.arange(t.shape[dim]) >= 3
            view = [1] * t.dim()
            view[dim] = t.shape[dim]
            dropped[site].append(float((~keep).float().mean()))
            return torch.where(keep | ~pos.view(view), t, torch.zeros_like(t))
        return hook

    hooks = {"qkv_in": cut("qkv", 1), "heads": cut("o", 2), "fc1_in": cut("fc1", 1), "neurons": cut("fc2", 1)}
    want = model.prefill(tokens, all_logits=True, hooks=hooks)
    assert rel(got, want) <= 1e-5
    assert rel(got[:, 3:], model.prefill(tokens, all_logits=True)[:, 3:]) > 1e-3
    # on the text it was calibrated on, about 40% of each site's entries fall below the threshold
    assert all(0.2 < sum(v) / len(v) < 0.7 for v in dropped.values()), dropped


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("first_sparse", [1, 0])
def test_threshold_mode_decodes_like_its_masked_forward(family, backend, first_sparse):
    """The threshold mode's decode step (index lists from the thresholds on the device, input-sparse gather-columns
    GEMVs over transposed weights; Llama's residual add and norm, and its silu(gate) * up, made where the inputs are
    selected) gives the logits of the masked forward of quality runs, and reads about the weights the calibrated
    sparsity leaves; layer 0 too when it is sparse (nothing to add before its norm)."""
    from bench.latency import random_thresholds
    from models.modes import Threshold

    model = tiny(family)
    mode = Threshold(0.5, random_thresholds(model, 0.5, tokens=48), first_sparse=first_sparse)
    tokens = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))
    gen = Generator(model, mode, batch=1, max_len=9, backend=backend)
    steps = teacher_forced(gen, tokens, 5)[:, 0]
    got = sparse_logits(model, tokens, mode, 5)[0, 5:]
    assert rel(steps, got) <= (1e-4 if backend == "torch" else 2e-3)
    assert rel(got, model.prefill(tokens, all_logits=True)[0, 5:]) > 1e-3
    read, dense = mode.step_weight_bytes(), model.step_weight_bytes()
    kept = [n for layer in mode.live_counts()["inputs"] for n in layer.values()]
    assert min(kept) > 0 and read < 0.8 * dense


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_kind_without_a_budget_is_planned_dense_and_runs_no_net(family):
    """Sparsity 0 for one kind: its plan has no index lists (the decode step's dense path), it counts every unit, it
    is never selected, and DejaVu neither runs nor counts the bytes of the nets for it."""
    model = tiny(family)
    cfg = model.cfg
    full = DejaVu(0.5, "random", "token", hidden=16).bind(model)
    heads_only = DejaVu(0.5, full.predictor, "token").set_budgets(0.5, 0.0).bind(model)
    neurons_only = DejaVu(0.5, full.predictor, "token").set_budgets(0.0, 0.5).bind(model)
    p = heads_only.plan(1)
    assert p.neurons is None and p.neuron_count is None and p.qkv_rows is not None
    q = neurons_only.plan(1)
    assert q.qkv_rows is None and q.out_rows is None and q.neurons is not None
    assert q.head_slot.tolist() == list(range(cfg.n_heads))
    assert heads_only.observed_sites == ("input",) and neurons_only.observed_sites == ("ffn_in",)
    assert full.observed_sites == ("input", "ffn_in")
    net_bytes = lambda key: sum(t.nbytes for t in full._net(key))
    L = range(1, cfg.n_layers)
    assert heads_only.predictor_bytes() == full.predictor_bytes() - sum(net_bytes((i, "ffn_in")) for i in L)
    assert neurons_only.predictor_bytes() == full.predictor_bytes() - sum(net_bytes(i) for i in L)
    assert heads_only.live_counts()["neurons"] == [cfg.ffn] * (cfg.n_layers - 1)
    assert neurons_only.live_counts()["heads"] == [cfg.n_heads] * (cfg.n_layers - 1)
    assert heads_only.step_weight_bytes() < model.step_weight_bytes()
    # a step: the neurons' plan is never filled, the heads' is
    gen = Generator(model, heads_only, batch=1, max_len=8, backend="torch")
    gen.generate(torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(3)), 2)
    assert int(heads_only.buffers.neuron_count.sum()) == 0
    assert sum(heads_only.live_counts()["heads"]) < cfg.n_heads * (cfg.n_layers - 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["shadowllm-staged", "dejavu"])
def test_neuron_threshold_rule_decodes_like_its_masked_forward(kind, backend):
    """neuron_rule 'threshold': each sparse layer keeps the neurons whose predicted score passes that layer's
    threshold, calibrated on other text so that about 1 - s of them pass; the count varies per token. Before
    calibration the mode says so; the decode step (index lists from the mask, on the device) gives the masked
    forward's logits; the thresholds survive the Generator's bind."""
    from models.modes import make_mode
    from models.sparse_forward import PositionPlans, calibrate_neuron_thresholds

    model = tiny("llama")
    extra = dict(shadowllm_input="residual", shadowllm_stages=(1, 2)) if kind.startswith("shadowllm") else {}
    mode = make_mode(kind.split("-")[0], sparsity=0.5, policy="local", predictor="random", neuron_rule="threshold",
                     **extra).bind(model)
    tokens = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="no thresholds yet"):
        sparse_logits(model, tokens, mode, 5)
    gen_ = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, V, (30,), generator=gen_).tolist() for _ in range(4)]
    t = calibrate_neuron_thresholds(model, mode, windows)
    assert t.shape == (model.cfg.n_layers - 1,) and torch.isfinite(t).all()
    # a sparse pass over the calibration text keeps about half of each layer's neurons, a count that varies per token
    plans = PositionPlans(model, mode, 1, 30, 1)
    model.prefill(torch.tensor([windows[0]]), all_logits=True, hooks=plans.hooks())
    for i in range(1, model.cfg.n_layers):
        kept = plans.neuron_masks[i][0, 1:].float().sum(-1)  # [positions]
        assert 0.25 < float(kept.mean()) / model.cfg.ffn < 0.75 and int(kept.max()) > int(kept.min())
    gen = Generator(model, mode, batch=1, max_len=9, backend=backend)
    steps = teacher_forced(gen, tokens, 5)[:, 0]
    got = sparse_logits(model, tokens, mode, 5)[0, 5:]
    assert rel(steps, got) <= (1e-4 if backend == "torch" else 2e-3)
    assert rel(got, model.prefill(tokens, all_logits=True)[0, 5:]) > 1e-3
    # heads only under the rule: no neuron budget, nothing to calibrate, every neuron kept (top-k's heads-only logits)
    heads_only = [make_mode(kind.split("-")[0], sparsity=0.5, policy="local", predictor=mode.predictor,
                            neuron_rule=rule, head_sparsity=0.5, neuron_sparsity=0.0, **extra)
                  for rule in ("threshold", "topk")]
    a, b = (sparse_logits(model, tokens, m.bind(model), 5) for m in heads_only)
    assert torch.equal(a, b)


def test_neuron_threshold_rule_refuses_what_it_cannot_do():
    from models.modes import make_mode
    from models.ops import get_ops
    from models.plan import PlanBuffers

    with pytest.raises(ValueError, match="modes oracle, dejavu, shadowllm, got 'static'"):
        make_mode("static", importance={"heads": torch.ones(2, 2), "neurons": torch.ones(2, 4)},
                  neuron_rule="threshold")
    with pytest.raises(ValueError, match="neuron_rule must be one of"):
        make_mode("shadowllm", predictor="random", neuron_rule="adaptive")
    kw = dict(n_layers=3, first=1, n_heads=2, head_dim=4, ffn=8, sparsity=0.5, device="cpu",
              ops=get_ops("torch", torch.device("cpu")))
    with pytest.raises(ValueError, match="needs policy 'local' and one rank"):
        PlanBuffers(policy="global", neuron_rule="threshold", **kw)
    b = PlanBuffers(policy="local", neuron_rule="threshold", **kw)
    assert b.slots_neurons == 8  # any count may pass
    with pytest.raises(ValueError, match=r"2 finite values \(one per sparse layer\), got shape \(3,\)"):
        b.set_neuron_thresholds(torch.zeros(3))
    with pytest.raises(ValueError, match="neuron thresholds are for neuron_rule 'threshold'"):
        PlanBuffers(policy="local", **kw).set_neuron_thresholds(torch.zeros(2))
    b.set_neuron_thresholds(torch.tensor([0.0, 1.0]))
    mask = b.select(torch.tensor([[[-1.0, 0.5, 2.0, 0.0, 1.0, 3.0, -2.0, 0.1]] * 2]), "neurons", layer=1)
    assert mask[0, 0].tolist() == [False, True, True, False, True, True, False, True]
    assert mask[0, 1].tolist() == [False, False, True, False, False, True, False, False]
