from contextlib import contextmanager

import torch

from conftest import DEVICE, REL_TOL


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=DEVICE, dtype=dtype)


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "output has non-finite values"
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)


def assert_close_rel(out, ref, dtype):
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]:.3g} for {dtype}"


def assert_within_dot_bound(out, ref, magnitude, dtype):
    """Elementwise |out - ref| <= tol * magnitude, where ``magnitude`` is sum_i |w_i x_i| (+ |b|) of each
    output: the scale a rounding error of a dot product is proportional to. A norm-relative bound fails
    on an output whose terms cancel (a small result from large terms), which is not a kernel error.
    Plus one subnormal step of ``dtype``: a result below its smallest normal is rounded at that spacing
    however small the terms are (hypothesis found |-1.967e-6 - -1.940e-6| in fp16, half a step)."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref, magnitude = out.double().cpu(), ref.double().cpu(), magnitude.double().cpu()
    assert torch.isfinite(out).all(), "output has non-finite values"
    info = torch.finfo(dtype)
    excess = (out - ref).abs() - REL_TOL[dtype] * magnitude - info.tiny * info.eps
    worst = int(excess.flatten().argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.flatten()[worst] <= 0, (
        f"output {worst}: |{out.flatten()[worst]:.6g} - {ref.flatten()[worst]:.6g}| exceeds "
        f"{REL_TOL[dtype]:.3g} x {magnitude.flatten()[worst]:.6g} for {dtype}")


def random_importance(cfg, seed=0):
    """Static-mode importance scores of the right shapes: heads [L, H], neurons [L, F]."""
    g = torch.Generator().manual_seed(seed)
    return {"heads": torch.rand(cfg.n_layers, cfg.n_heads, generator=g),
            "neurons": torch.rand(cfg.n_layers, cfg.ffn, generator=g)}


def tiny_decoder(family, dtype=torch.float32, seed=1, std=0.2, **overrides):
    """A small random OPT (pre-LN) or Llama (grouped-query) decoder on the CPU; ``overrides`` change its config."""
    from models.config import DecoderConfig
    from models.llama import LlamaDecoder
    from models.opt import OPTDecoder

    if family == "opt":
        base = dict(family="opt", vocab=97, hidden=32, ffn=64, n_layers=4, n_heads=4, n_kv_heads=4,
                    max_positions=64, word_embed_dim=None, pre_norm=True, final_norm=True)
    else:
        base = dict(family="llama", vocab=97, hidden=64, ffn=96, n_layers=4, n_heads=4, n_kv_heads=2,
                    max_positions=64, activation="silu", tie_embeddings=False, rope_theta=500.0)
    cfg = DecoderConfig(**{**base, **overrides})
    return (OPTDecoder if family == "opt" else LlamaDecoder).random(cfg, dtype, "cpu", seed=seed, std=std)


def teacher_forced(gen, tokens, start):
    """Prefill ``tokens[:, :start]``, then decode the rest one token at a time with the given tokens;
    returns the step logits [steps, B, V] (fp32)."""
    gen.prefill(tokens[:, :start])
    steps = []
    for t in range(start, tokens.shape[1]):
        gen.tok.copy_(tokens[:, t])
        steps.append(gen.step().float().clone())
    return torch.stack(steps)


def check_decode_against_masked_reference(model, mode, backend, plan_masks, masked_reference):
    """Decode 4 teacher-forced steps after a 5-token prompt (batch 2), record each step's plan as masks,
    replay them through ``masked_reference`` and compare logits; then check that the last plan keeps the
    budget (k per layer, or k times the sparse layers in all) and that layer 0 stays dense."""
    from models.generate import Generator
    from models.plan import kept_units

    torch.manual_seed(0)
    cfg = model.cfg
    B, P, steps = 2, 5, 4
    tokens = torch.randint(0, cfg.vocab, (B, P + steps), generator=torch.Generator().manual_seed(1))
    gen = Generator(model, mode, batch=B, max_len=P + steps, backend=backend)
    gen.prefill(tokens[:, :P])
    got, hms, nms = [], {}, {}
    for t in range(P, P + steps):
        gen.tok.copy_(tokens[:, t])
        got.append(gen.step().clone())
        hms[t], nms[t] = plan_masks(mode, model)
    ref = masked_reference(model, tokens, P, hms, nms)
    err = float((torch.stack(got, 1).double() - ref.double()).norm() / ref.double().norm())
    assert err <= 1e-4, err
    hm, nm = hms[P + steps - 1], nms[P + steps - 1]
    n_sparse = cfg.n_layers - 1
    assert not hm[1:].all() and not nm[1:].all()
    k_h, k_f = kept_units(cfg.n_heads, mode.sparsity), kept_units(cfg.ffn, mode.sparsity)
    if getattr(mode, "batch_rule", "mean") == "union":  # between one sequence's budget and B of them
        for m, k, n in ((hm, k_h, cfg.n_heads), (nm, k_f, cfg.ffn)):
            if mode.policy == "local":
                assert (m[1:].sum(1) >= k).all() and (m[1:].sum(1) <= min(n, B * k)).all()
            else:
                assert k * n_sparse <= int(m[1:].sum()) <= B * k * n_sparse
    elif mode.policy == "local":
        assert (hm[1:].sum(1) == k_h).all() and (nm[1:].sum(1) == k_f).all()
    else:
        assert int(hm[1:].sum()) == k_h * n_sparse and int(nm[1:].sum()) == k_f * n_sparse
    assert hm[0].all() and nm[0].all()


def plan_masks_checked(mode, model, check_layer):
    """The current plan of ``mode`` as masks [L, H], [L, F] (dense layers all True); ``check_layer(i, plan,
    head_mask)`` checks the family's row layout of each sparse layer on the way."""
    cfg = model.cfg
    hm = torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    nm = torch.ones(cfg.n_layers, cfg.ffn, dtype=torch.bool)
    for i in range(cfg.n_layers):
        plan = mode.plan(i)
        if plan.neurons is not None:  # (None: every neuron, the dense path)
            nm[i] = False
            nm[i, plan.neurons[: int(plan.neuron_count)].long().cpu()] = True
        if plan.qkv_rows is not None:  # (None: every head)
            hm[i] = plan.head_slot.cpu() >= 0
            check_layer(i, plan, hm[i])
    return hm, nm


def constant_predictor(pred, scores):
    """Make a predictor output `scores` whatever its input: relu(0 x + 1) = 1, then w2 = 0, b2 = scores (exactly, in
    every backend)."""
    from models.predictors import ShadowLLMPredictor

    if isinstance(pred, ShadowLLMPredictor):
        pairs = [(pred.net, scores[0])] if len(scores) == 1 else None
    elif pred.neuron_input == "mlp":  # heads from the input nets, neurons from the MLP-input nets
        H = pred.cfg.n_heads
        pairs = [(n, s[:H]) for n, s in zip(pred.nets, scores, strict=True)]
        pairs += [(n, s[H:]) for n, s in zip(pred.ffn_nets, scores, strict=True)]
    else:
        pairs = list(zip(pred.nets, scores, strict=True))
    assert pairs is not None, "a ShadowLLM predictor takes one score vector"
    with torch.no_grad():
        for net, s in pairs:
            net[0].weight.zero_()
            net[0].bias.fill_(1.0)
            net[2].weight.zero_()
            net[2].bias.copy_(s)
    return pred


def check_pdl_chain(chain):
    """``chain()`` launched with programmatic dependent launch, eagerly and replayed three times in a CUDA graph,
    gives the bits it gives without PDL (the GPU tests of kernels that read before their producer finishes)."""
    from shadow_kernels.pdl import set_pdl

    prev = set_pdl(False)
    try:
        ref = chain()
        set_pdl(True)
        assert torch.equal(chain(), ref)
        out = torch.empty_like(ref)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(chain())
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, ref)
    finally:
        set_pdl(prev)


@contextmanager
def only_configs(tuner, configs):
    """Run a Triton autotuner with these configs only (its cached choices dropped before and after)."""
    saved = list(tuner.configs)
    tuner.configs = list(configs)
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = saved
        tuner.cache.clear()
