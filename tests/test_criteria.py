"""Pruning criteria against independent computations on tiny models (float64)."""

import pytest
import torch

from models.criteria import AGGREGATE, CRITERIA, Batch, compute

from helpers import tiny_decoder

V = 61


def tiny(family):
    return tiny_decoder(family, torch.float64, seed=3, std=0.3, vocab=V, hidden=16, ffn=24, n_layers=3,
                        max_positions=32, **({"n_heads": 2, "n_kv_heads": 2} if family == "opt" else {}))


PAIRS = [([3, 7, 11, 2], [5, 9]), ([4, 4, 1], [8, 2, 6]), ([10, 20, 30, 40, 50], [1])]


def batch(pairs=PAIRS):
    return Batch.from_pairs(pairs)


def loss_with(model, b, hooks):
    return b.target_loss(model.prefill(b.tokens, all_logits=True, hooks=hooks)).sum()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_batched_equals_one_at_a_time(family):
    """Padding and batching do not leak between examples: every per-example criterion is the same when
    each example runs alone."""
    model = tiny(family)
    per = [c for c in CRITERIA if c not in AGGREGATE]
    full = compute(model, batch(), per)
    for b, pair in enumerate(PAIRS):
        alone = compute(model, batch([pair]), per)
        for c in per:
            for kind in ("heads", "neurons"):
                torch.testing.assert_close(full[c][kind][b], alone[c][kind][0], rtol=1e-8, atol=1e-10,
                                           msg=f"{c} {kind} example {b}")
        torch.testing.assert_close(full["attn0"][b], alone["attn0"][0])
        torch.testing.assert_close(full["inputs"][b], alone["inputs"][0])
        torch.testing.assert_close(full["ffn_inputs"][b], alone["ffn_inputs"][0])


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_snip_of_a_head_is_the_first_order_loss_change_of_removing_it(family):
    """snip = |dL/dc| for a gate c on the head's output = |sum A * dL/dA|, by central differences on c;
    plainact (|A * dL/dA| summed) bounds it from above."""
    model = tiny(family)
    b = batch([PAIRS[0]])
    got = compute(model, b, ["snip", "plainact"])
    eps = 1e-6

    def scaled(layer, h, c):
        def hook(i, heads):
            if i != layer:
                return heads
            gate = torch.ones(heads.shape[1], dtype=heads.dtype)
            gate[h] = c
            return heads * gate[None, :, None, None]
        return loss_with(model, b, {"heads": hook})

    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            fd = (scaled(layer, h, 1 + eps) - scaled(layer, h, 1 - eps)) / (2 * eps)
            assert abs(float(got["snip"]["heads"][0, layer, h]) - abs(float(fd))) <= 1e-6 * max(1.0, abs(float(fd)))
    assert (got["plainact"]["heads"] >= got["snip"]["heads"] - 1e-12).all()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_neuron_weight_criteria_match_autograd_on_the_weights(family):
    """At the weight site, plainact/fisher/gradnorm/snip of neuron f use dL/dtheta_f; here it comes
    from autograd on the real weight tensors, one example at a time."""
    model = tiny(family)
    names = ("fc1_w",) if family == "opt" else ("gate_w", "up_w")
    got = compute(model, batch(), ["plainact", "fisher", "gradnorm", "snip"])
    for b, pair in enumerate(PAIRS):
        one = batch([pair])
        params = [getattr(layer, n) for layer in model.layers for n in names]
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        try:
            with torch.enable_grad():
                loss_with(model, one, None).backward()
            for i, layer in enumerate(model.layers):
                th = [getattr(layer, n).detach() for n in names]
                gr = [getattr(layer, n).grad for n in names]
                tg = torch.cat([t * g for t, g in zip(th, gr, strict=True)], dim=1)
                want = {"plainact": tg.abs().sum(1), "fisher": tg.pow(2).mean(1),
                        "gradnorm": torch.cat(gr, dim=1).norm(dim=1), "snip": tg.sum(1).abs()}
                for c, w in want.items():
                    torch.testing.assert_close(got[c]["neurons"][b, i], w, rtol=1e-7, atol=1e-12, msg=f"{c} {i}")
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None


def test_activation_criteria_from_the_definitions():
    model = tiny("opt")
    b = batch([PAIRS[1]])
    got = compute(model, b, ["l2norm", "nwot"], neuron_site="activation")
    seen = {}
    model.prefill(b.tokens, all_logits=True, hooks={"heads": lambda i, h: seen.setdefault(("h", i), h),
                                                   "neurons": lambda i, f: seen.setdefault(("n", i), f)})
    for i in range(model.cfg.n_layers):
        A, f = seen[("h", i)][0], seen[("n", i)][0]  # [H, P, D], [P, F]
        torch.testing.assert_close(got["l2norm"]["heads"][0, i], A.pow(2).sum((1, 2)).sqrt())
        torch.testing.assert_close(got["l2norm"]["neurons"][0, i], f.norm(dim=0))
        torch.testing.assert_close(got["nwot"]["neurons"][0, i], torch.log((f <= 0).double().mean(0) + 1e-6))


def test_grasp_matches_a_finite_difference_hessian_vector_product():
    """grasp = |(H g) * A| summed, H the Hessian over all head and neuron activations and g = dL/dA;
    H g here by central differences of the gradient along g."""
    model = tiny("opt")
    b = batch([PAIRS[0]])
    got = compute(model, b, ["grasp"], neuron_site="activation")
    L = model.cfg.n_layers

    def grads(shift):
        probes = {}

        def probe(kind):
            def hook(i, t):
                p = torch.zeros_like(t, requires_grad=True)
                probes[(kind, i)] = p
                return t + p + (shift[(kind, i)] if shift else 0)
            return hook
        with torch.enable_grad():
            loss = loss_with(model, b, {"heads": probe("heads"), "neurons": probe("neurons")})
            keys = sorted(probes)
            return dict(zip(keys, torch.autograd.grad(loss, [probes[k] for k in keys]), strict=True))

    g = grads(None)
    eps = 1e-5
    plus = grads({k: eps * v for k, v in g.items()})
    minus = grads({k: -eps * v for k, v in g.items()})
    acts = {}
    model.prefill(b.tokens, all_logits=True, hooks={"heads": lambda i, h: acts.setdefault(("heads", i), h),
                                                   "neurons": lambda i, f: acts.setdefault(("neurons", i), f)})
    for i in range(L):
        hv = (plus[("heads", i)] - minus[("heads", i)]) / (2 * eps)
        want = (hv * acts[("heads", i)]).abs().sum(dim=(2, 3))[0]
        torch.testing.assert_close(got["grasp"]["heads"][0, i], want, rtol=1e-5, atol=1e-9)
        hv = (plus[("neurons", i)] - minus[("neurons", i)]) / (2 * eps)
        want = (hv * acts[("neurons", i)]).abs().sum(dim=1)[0]
        torch.testing.assert_close(got["grasp"]["neurons"][0, i], want, rtol=1e-5, atol=1e-9)


def test_aggregate_criteria_are_one_value_per_batch():
    model = tiny("llama")
    pairs = PAIRS + [([9, 9, 2], [5, 1]), ([7, 1, 2, 3], [8])]  # classes (first targets): 5, 8, 1, 5, 8
    got = compute(model, batch(pairs), ["jacov", "epenas"])
    for c in ("jacov", "epenas"):
        for kind in ("heads", "neurons"):
            v = got[c][kind]
            assert torch.isfinite(v).all()
            assert (v == v[:1]).all(), f"{c} {kind} must not depend on the example"
            assert v[0].std() > 0, f"{c} {kind} should rank units"
    no_repeat = compute(model, batch(PAIRS), ["epenas"])  # classes 5, 8, 1: no pair to correlate
    assert (no_repeat["epenas"]["heads"] == 0).all()


def test_bad_arguments():
    model = tiny("opt")
    with pytest.raises(ValueError, match="unknown criterion 'magnitude'; known: l2norm"):
        compute(model, batch(), ["magnitude"])
    with pytest.raises(ValueError, match="neuron_site must be one of"):
        compute(model, batch(), ["plainact"], neuron_site="bias")
    with pytest.raises(ValueError, match="example 0 has 0 context"):
        Batch.from_pairs([([], [1])])
