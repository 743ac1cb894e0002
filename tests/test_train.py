"""Predictor training and ranking quality on synthetic, learnable targets."""

import pytest
import torch

from models.config import DecoderConfig
from models.predictors import load_predictor
from models.train import Normaliser, Targets, rank_quality, spearman, train_predictor


def cfg():
    return DecoderConfig(family="llama", vocab=50, hidden=16, ffn=24, n_layers=4, n_heads=4, n_kv_heads=2,
                         max_positions=32, activation="silu", tie_embeddings=True, name="tiny")


def synthetic(c, n=384, seed=0):
    """Scores that are smooth functions of the inputs, with a different scale per layer (as real criteria)."""
    g = torch.Generator().manual_seed(seed)
    L, H, F, E = c.n_layers, c.n_heads, c.ffn, c.hidden
    attn0 = torch.randn(n, E, generator=g)
    inputs = torch.randn(n, L, E, generator=g)
    ffn_inputs = torch.randn(n, L, E, generator=g)
    wh, wf = torch.randn(E, L * H, generator=g) / E**0.5, torch.randn(E, L * F, generator=g) / E**0.5
    scale = torch.logspace(-2, 1, L)[None, :, None]
    heads = torch.nn.functional.softplus(attn0 @ wh).view(n, L, H) * scale
    neurons = torch.nn.functional.softplus(attn0 @ wf).view(n, L, F) * scale
    dj_h = torch.nn.functional.softplus(torch.einsum("nle,eh->nlh", inputs, wh[:, :H]))
    # "dj": neurons a function of the MLP inputs; "djl": of the layer inputs (both: heads of the layer inputs)
    return ({"plainact.heads": heads, "plainact.neurons": neurons, "attn0": attn0, "inputs": inputs.half(),
             "ffn_inputs": ffn_inputs.half(), "dj.heads": dj_h * scale, "dj.neurons": torch.nn.functional.softplus(
                 torch.einsum("nle,ef->nlf", ffn_inputs, wf[:, :F])) * scale,
             "djl.heads": dj_h * scale, "djl.neurons": torch.nn.functional.softplus(
                 torch.einsum("nle,ef->nlf", inputs, wf[:, :F])) * scale,
             "jacov.heads": heads[0], "jacov.neurons": neurons[0]})


def test_spearman():
    x = torch.randn(3, 50)
    assert torch.allclose(spearman(x, x), torch.ones(3))
    assert torch.allclose(spearman(x, -x), -torch.ones(3))
    assert torch.allclose(spearman(x, x.exp()), torch.ones(3))  # monotone maps keep the ranking


def test_shadowllm_learns_a_learnable_target_and_val_loss_falls():
    c = cfg()
    res = train_predictor("shadowllm", c, synthetic(c), "plainact", hidden=128, epochs=40, log=True)
    losses = [h["val_loss"] for h in res.history]
    assert min(losses) < 0.5 * losses[0]
    q = res.quality
    assert q["heads"]["global"] > 0.9 and q["neurons"]["global"] > 0.9, q
    assert q["neurons"]["local"] > 0.8, q
    assert res.n_train + res.n_val + res.n_test == 384 and res.n_val == 77 and res.n_test == 77
    # rho is reported on the test split, beside the per-unit mean of the training targets; the synthetic targets
    # depend on the input, so the predictor ranks neurons within a layer far better than any constant order
    assert res.predictor.meta["rho_split"] == "test"
    assert q["neurons"]["local"] > res.baselines["unit_mean"]["neurons"]["local"] + 0.3, res.baselines


def test_dejavu_learns_per_layer_targets(tmp_path):
    """The default DejaVu predictor scores neurons from the MLP inputs (it learns neurons that are a function of them;
    the layer-input variant cannot), the "layer" variant from the layer inputs; both round-trip through a file."""
    c = cfg()
    t = synthetic(c)
    res = train_predictor("dejavu", c, t, "dj", hidden=64, epochs=40, normalisation="layer", log=True)
    assert res.predictor.neuron_input == "mlp"
    assert res.quality["neurons"]["local"] > 0.8 and res.quality["heads"]["local"] > 0.8, res.quality
    blind = train_predictor("dejavu", c, t, "dj", hidden=64, epochs=40, normalisation="layer", log=True,
                            neuron_input="layer")
    assert blind.quality["neurons"]["local"] < 0.3, blind.quality
    layer = train_predictor("dejavu", c, t, "djl", hidden=64, epochs=40, normalisation="layer", log=True,
                            neuron_input="layer")
    assert layer.quality["neurons"]["local"] > 0.8, layer.quality
    x, a = torch.randn(2, c.hidden), torch.randn(2, c.hidden)
    for r, name in ((res, "dj"), (layer, "djl")):
        path = r.predictor.save(tmp_path / f"{name}.safetensors")
        loaded = load_predictor(path, c, dtype=torch.float32)
        assert loaded.meta["criterion"] == name and loaded.meta["normalisation"] == "layer"
        assert loaded.neuron_input == r.predictor.neuron_input
        assert torch.allclose(loaded(x, 2)[0], r.predictor(x, 2)[0])
    assert torch.allclose(loaded(x, 2)[1], layer.predictor(x, 2)[1])
    small = train_predictor("dejavu", c, t, "dj", hidden=64, ffn_hidden=8, epochs=1)
    assert small.predictor.ffn_nets[0][0].weight.shape == (8, c.hidden)
    loaded = load_predictor(small.predictor.save(tmp_path / "small.safetensors"), c, dtype=torch.float32)
    assert torch.allclose(loaded.forward_ffn(a, 3), small.predictor.forward_ffn(a, 3))
    no_mlp = {k: v for k, v in t.items() if k != "ffn_inputs"}
    with pytest.raises(ValueError, match="no 'ffn_inputs'"):
        train_predictor("dejavu", c, no_mlp, "dj", epochs=1)


def test_global_normalisation_keeps_cross_layer_order_and_layer_does_not():
    c = cfg()
    t = synthetic(c)
    tg = Targets(t["plainact.heads"], t["plainact.neurons"])
    for scheme, keeps in (("global", True), ("layer", False)):
        y = Normaliser(scheme, log=False).fit(tg).apply(tg)
        q = rank_quality(y, tg)
        assert q["heads"]["local"] > 0.999
        assert (q["heads"]["global"] > 0.999) == keeps, (scheme, q)


def test_bad_arguments():
    c = cfg()
    t = synthetic(c, n=20)
    with pytest.raises(ValueError, match="criterion 'fisher' is not in this dataset; it has"):
        train_predictor("shadowllm", c, t, "fisher", epochs=1)
    with pytest.raises(ValueError, match="aggregate-only"):
        train_predictor("shadowllm", c, t, "jacov", epochs=1)
    with pytest.raises(ValueError, match="kind must be"):
        train_predictor("moe", c, t, "plainact", epochs=1)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        train_predictor("shadowllm", c, t, "plainact", epochs=1, normalisation="batch")
    bigger = DecoderConfig(**{**c.__dict__, "ffn": 32})
    with pytest.raises(ValueError, match="do not fit the model"):
        train_predictor("shadowllm", bigger, t, "plainact", epochs=1)


def test_splits_keep_a_sequence_on_one_side_and_refuse_too_little_data():
    from models.train import _split

    groups = torch.repeat_interleave(torch.arange(20), 7)  # 20 sequences of 7 positions
    tr, va, te = _split(len(groups), 0.2, 0, groups, 0.2)
    sides = [set(groups[p].tolist()) for p in (tr, va, te)]
    assert len(tr) + len(va) + len(te) == 140 and not (sides[0] & sides[1]) and not (sides[0] & sides[2])
    assert len(sides[1]) == 4 and len(sides[2]) == 4
    with pytest.raises(ValueError, match="too few to hold out"):
        _split(2, 0.5, 0, None, 0.4)
    with pytest.raises(ValueError, match="must be below 1"):
        _split(100, 0.6, 0, None, 0.5)


def test_per_token_dataset_trains_in_fp16_with_source_baselines(tmp_path):
    """collect --per-token on the tiny model, then training reads fp16 targets a batch at a time, splits by
    sequence and reports rho on held-out sequences beside the per-unit and per-source means."""
    from bench.collect import collect_tokens, load_dataset
    from models.loading import TINY_RANDOM, load_model
    from models.tokenizer import load_tokenizer

    model = load_model(TINY_RANDOM, dtype="float32")
    path = collect_tokens(model, load_tokenizer(TINY_RANDOM), tasks=["copa"], per_task=6, wikitext_tokens=1200,
                          context=64, out_dir=tmp_path / "ct", progress=False)
    tensors, meta = load_dataset(path)
    assert tensors["plainact.neurons"].dtype == torch.float16 and meta["sources"] == ["wikitext2-valid", "copa"]
    assert len(tensors["attn0"]) == meta["rows"] == len(tensors["row_group"]) > 1000
    # each row's MLP inputs are its position's: one sequence again through the model, the hook's values at its rows
    from bench.collect import token_sequences

    _, seqs, _ = token_sequences(load_tokenizer(TINY_RANDOM), tasks=["copa"], per_task=6, wikitext_tokens=1200,
                                 context=64)
    g = int(tensors["row_group"][-1])
    rows = torch.nonzero(tensors["row_group"] == g).flatten()
    seen = {}
    model.prefill(torch.tensor([seqs[g][1]]), all_logits=True, hooks={"ffn_in": lambda i, a: seen.setdefault(i, a)})
    want = torch.stack([seen[i][0] for i in range(model.cfg.n_layers)], 1)  # [P, L, E]
    assert tensors["ffn_inputs"].shape == tensors["inputs"].shape
    torch.testing.assert_close(tensors["ffn_inputs"][rows].float(), want[tensors["row_position"][rows].long()].half()
                               .float())
    res = train_predictor("shadowllm", model.cfg, tensors, "l2norm", hidden=32, epochs=2, batch_size=64)
    assert res.n_test > 0 and set(res.baselines) == {"unit_mean", "source_mean"}
    for b in res.baselines.values():
        assert -1.0 <= b["neurons"]["local"] <= 1.0


def test_log1p_normaliser_keeps_orders_and_needs_no_offset():
    t = Targets(torch.rand(50, 3, 4) * torch.logspace(0, 4, 3)[None, :, None],
                torch.rand(50, 3, 6) * torch.logspace(0, 4, 3)[None, :, None])
    y = Normaliser("layer", "log1p").fit(t).apply(t)
    assert torch.equal(y.neurons.argsort(-1), t.neurons.argsort(-1))
    assert y.heads.mean(dim=(0, 2)).abs().max() < 1e-4  # z-scored per layer
    with pytest.raises(ValueError, match="log must be"):
        train_predictor("shadowllm", cfg(), synthetic(cfg()), "plainact", epochs=1, log="sqrt")


def test_per_token_rows_from_the_oracle_trajectory(tmp_path):
    """collect --per-token --under-oracle: position 0 and the first sparse layer's input are the dense run's (layer 0
    is dense; its attention already differs, since skipped heads left earlier positions without keys and values),
    later layers' inputs drift from it (the layers before were sparse), and every unit keeps its target (recorded
    before the plan drops it)."""
    from bench.collect import collect_tokens, load_dataset
    from models.loading import TINY_RANDOM, load_model
    from models.tokenizer import load_tokenizer

    model = load_model(TINY_RANDOM, dtype="float32")
    tok = load_tokenizer(TINY_RANDOM)
    kw = dict(tasks=[], wikitext_tokens=200, context=64, criteria=["l2norm"], progress=False)
    dense, _ = load_dataset(collect_tokens(model, tok, out_dir=tmp_path / "d", **kw))
    sparse, meta = load_dataset(collect_tokens(model, tok, out_dir=tmp_path / "s", under_oracle=0.5, **kw))
    assert meta["trajectory"]["sparsity"] == 0.5
    assert torch.equal(dense["row_group"], sparse["row_group"]) and torch.equal(dense["row_position"],
                                                                                 sparse["row_position"])
    first = sparse["row_position"] == 0
    for key in ("inputs", "ffn_inputs", "l2norm.heads", "l2norm.neurons"):
        torch.testing.assert_close(sparse[key][first], dense[key][first])
    torch.testing.assert_close(sparse["inputs"][:, 1], dense["inputs"][:, 1])
    drift = (sparse["inputs"][~first, 2:].float() - dense["inputs"][~first, 2:].float()).abs().mean()
    assert drift > 1e-2 * dense["inputs"][~first, 2:].float().abs().mean()
    assert (sparse["l2norm.neurons"][:, 1:] == 0).float().mean() < 0.1  # targets of dropped neurons are kept
    with pytest.raises(ValueError, match="l2norm only"):
        collect_tokens(model, tok, out_dir=tmp_path / "p", under_oracle=0.5, **dict(kw, criteria=["plainact"]))


@pytest.mark.parametrize("neuron_input", ["mlp", "layer"])
def test_dejavu_scores_every_layer_at_once_as_layer_by_layer(neuron_input):
    from models.predictors import DejaVuPredictor

    c = cfg()
    p = DejaVuPredictor(c, 8, 1, torch.float32, "cpu", neuron_input=neuron_input, ffn_hidden=6 if neuron_input ==
                        "mlp" else None)
    x, a = torch.randn(5, c.n_layers - 1, c.hidden), torch.randn(5, c.n_layers - 1, c.hidden)
    h, n = p.forward_all(x, a if neuron_input == "mlp" else None)
    for j in range(c.n_layers - 1):
        hj, nj = p(x[:, j], 1 + j)
        if neuron_input == "mlp":
            nj = p.forward_ffn(a[:, j], 1 + j)
        torch.testing.assert_close(h[:, j], hj)
        torch.testing.assert_close(n[:, j], nj)
    if neuron_input == "mlp":
        with pytest.raises(ValueError, match="pass a"):
            p.forward_all(x)


def _tiny_sequences(model, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(i % 3, torch.randint(0, model.cfg.vocab, (int(torch.randint(12, 40, (1,), generator=g)),),
                                  generator=g).tolist()) for i in range(n)]


def test_token_rows_of_a_padded_batch_are_each_sequences_own():
    """Right padding changes no real position's targets or inputs (attention is causal): a batch of unequal
    sequences gives the rows of each sequence run alone, plainact's gradient included."""
    from models.criteria import token_rows

    from helpers import tiny_decoder

    model = tiny_decoder("llama")
    seqs = [ids for _, ids in _tiny_sequences(model, 3)]
    P = max(map(len, seqs))
    tokens = torch.zeros((3, P), dtype=torch.long)
    for r, ids in enumerate(seqs):
        tokens[r, : len(ids)] = torch.tensor(ids)
    both = token_rows(model, tokens, torch.tensor([len(s) for s in seqs]), ("l2norm", "plainact"))
    alone = [token_rows(model, torch.tensor([ids]), torch.tensor([len(ids)]), ("l2norm", "plainact")) for ids in seqs]
    for key in ("l2norm.heads", "l2norm.neurons", "plainact.neurons", "attn0", "inputs", "ffn_inputs"):
        torch.testing.assert_close(both[key], torch.cat([a[key] for a in alone]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="snip"):
        token_rows(model, tokens, torch.tensor([len(s) for s in seqs]), ("snip",))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_per_position_targets_equal_per_position_autograd(family):
    """Each row of token_rows against its own computation: at position p, a zero probe added to that position's
    head outputs and neuron activations alone, the gradient of the sequence's summed next-token NLL with respect to
    it (torch.autograd.grad), and plainact = |A * dL/dA| (a head's summed over its output), l2norm = the head's
    output norm and the neuron's |activation|, from the same forward (float64 model; the rows are float32)."""
    from models.criteria import token_rows
    from models.decoder import token_nll

    from helpers import tiny_decoder

    model = tiny_decoder(family, dtype=torch.float64)
    ids = _tiny_sequences(model, 1, seed=3)[0][1][:14]
    tokens = torch.tensor([ids])
    rows = token_rows(model, tokens, torch.tensor([len(ids)]), ("l2norm", "plainact"), with_inputs=False)
    L = model.cfg.n_layers
    for p in (0, 5, len(ids) - 1):
        acts, probes = {}, {}

        def heads(i, h, p=p, probes=probes, acts=acts):
            z = torch.zeros_like(h[:, :, p:p + 1], requires_grad=True)
            probes[("h", i)], acts[("h", i)] = z, h[0, :, p].detach()
            return torch.cat([h[:, :, :p], h[:, :, p:p + 1] + z, h[:, :, p + 1:]], dim=2)

        def neurons(i, f, p=p, probes=probes, acts=acts):
            z = torch.zeros_like(f[:, p:p + 1], requires_grad=True)
            probes[("n", i)], acts[("n", i)] = z, f[0, p].detach()
            return torch.cat([f[:, :p], f[:, p:p + 1] + z, f[:, p + 1:]], dim=1)

        with torch.enable_grad():
            loss = token_nll(model.prefill(tokens, all_logits=True, hooks={"heads": heads, "neurons": neurons}),
                             tokens).sum()
            keys = sorted(probes)
            grads = dict(zip(keys, torch.autograd.grad(loss, [probes[k] for k in keys]), strict=True))
        for i in range(L):
            h, gh = acts[("h", i)], grads[("h", i)][0, :, 0]  # [H, D]
            f, gf = acts[("n", i)], grads[("n", i)][0, 0]  # [F]
            torch.testing.assert_close(rows["plainact.heads"][p, i], (h * gh).abs().sum(-1).float())
            torch.testing.assert_close(rows["plainact.neurons"][p, i], (f * gf).abs().float())
            torch.testing.assert_close(rows["l2norm.heads"][p, i], h.norm(dim=-1).float())
            torch.testing.assert_close(rows["l2norm.neurons"][p, i], f.abs().float())


def test_streamed_training_learns_splits_by_sequence_and_repeats_with_its_seed():
    from models.train import train_streaming

    from helpers import tiny_decoder

    model = tiny_decoder("llama")
    seqs = _tiny_sequences(model)
    kw = dict(hidden=64, epochs=6, batch_size=64, pool_tokens=400, model_batch=8, eval_rows=300)
    res = train_streaming("dejavu", model, seqs, "l2norm", **kw)
    hist = [h["val_loss"] for h in res.history]
    assert hist[-1] < hist[0]
    assert 0 < res.n_train < sum(len(ids) for _, ids in seqs)
    split = res.predictor.meta["sequences"]
    assert split["train"] + split["val"] + split["test"] == len(seqs) and split["val"] > 0 and split["test"] > 0
    # neurons of the MLP input: well above ranking every position by the units' mean
    assert res.quality["neurons"]["local"] > res.baselines["unit_mean"]["neurons"]["local"] + 0.05
    again = train_streaming("dejavu", model, seqs, "l2norm", **kw)
    for k, v in res.predictor.state_dict().items():
        torch.testing.assert_close(again.predictor.state_dict()[k], v)
    sh = train_streaming("shadowllm", model, seqs, "l2norm", **dict(kw, epochs=2))
    assert sh.predictor.kind == "shadowllm" and sh.predictor.meta["rows"] == "streamed from the model"


def test_streamed_training_refuses_bad_arguments():
    from models.train import train_streaming

    from helpers import tiny_decoder

    model = tiny_decoder("opt")
    seqs = _tiny_sequences(model, 8)
    for kwargs, match in (({"criterion": "snip"}, "snip"), ({"epochs": 0}, "epochs must be"),
                          ({"pool_tokens": 0}, "pool_tokens must be"), ({"kind": "medusa"}, "medusa"),
                          ({"sequences": []}, "no sequences"), ({"sequences": [(0, [])] + seqs}, "sequence 0 is empty"),
                          ({"normalisation": "row"}, "normalisation must be")):
        args = dict(kind="dejavu", model=model, sequences=seqs, criterion="l2norm")
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            train_streaming(**args)


def test_train_stream_command_saves_records_and_resumes(tmp_path, capsys):
    from bench.cli import main
    from models.loading import TINY_RANDOM, load_model

    argv = ["train-stream", "--model", TINY_RANDOM, "--tasks", "copa", "--per-task", "4", "--wikitext-tokens", "600",
            "--context", "48", "--epochs", "2", "--hidden", "16", "--batch", "64", "--pool-tokens", "400",
            "--eval-rows", "100", "--kind", "dejavu", "--out", str(tmp_path / "p"), "--results",
            str(tmp_path / "rows.jsonl"), "--no-progress"]
    assert main(argv) == 0
    assert "trained" in capsys.readouterr().out
    import json

    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} >= {"spearman_local_neurons", "spearman_local_neurons_source_mean", "val_mse"}
    assert rows[0]["extra"]["dataset"] == "stream" and rows[0]["extra"]["settings"]["stream"]["positions"]["copa"] > 0
    assert rows[0]["extra"]["settings"]["log"] == "log1p"  # the default transform
    pred = load_predictor(tmp_path / "p" / "dejavu-l2norm.safetensors", load_model(TINY_RANDOM).cfg)
    assert pred.neuron_input == "mlp" and pred.meta["rows"] == "streamed from the model"
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(rows)


def _folds_exactly(pred, x):
    """The input standardisation folded into ``pred``'s first layer(s): the folded net on raw ``x`` scores as the
    trained net on standardised ``x``. Returns those scores."""
    from models.train import _InputScale

    scale = _InputScale(x)
    want = pred(scale(x))
    scale.fold(pred)
    for got, w in zip(pred(x), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4)
    return want


def _residual_trained(streamed: bool, c, data, **kw):
    """A residual-input ShadowLLM trained briefly: streamed from tiny Llama, or on ``data`` (config ``c``)."""
    from models.train import train_streaming

    from helpers import tiny_decoder

    if streamed:
        model = tiny_decoder("llama")
        return train_streaming("shadowllm", model, _tiny_sequences(model), "l2norm", hidden=32, epochs=2,
                               batch_size=64, pool_tokens=400, model_batch=8, eval_rows=200,
                               shadowllm_input="residual", **kw)
    return train_predictor("shadowllm", c, data, "plainact", hidden=16, epochs=2, shadowllm_input="residual", **kw)


@pytest.mark.parametrize("streamed", [False, True])
def test_shadowllm_on_the_residual_stream_trains_folds_its_scaling_and_round_trips(tmp_path, streamed):
    """A ShadowLLM predictor reading layer 1's input: trained with that input standardised, the standardisation
    folded into its first layer (the saved net on the raw input scores as the trained net on the standardised one),
    and its file says which input it reads (an older file, without the field, reads layer 0's attention output)."""
    from models.predictors import ShadowLLMPredictor

    c = cfg()
    x = torch.randn(64, c.hidden) * torch.logspace(-1, 2, c.hidden)  # channels of very different scales
    _folds_exactly(ShadowLLMPredictor(c, 8, 1, torch.float32, "cpu", input_site="residual"), x)
    res = _residual_trained(streamed, c, synthetic(c))
    pred = res.predictor
    assert pred.input_site == "residual"
    path = pred.save(tmp_path / "p.safetensors")
    loaded = load_predictor(path, pred.cfg, dtype=torch.float32)
    assert loaded.input_site == "residual"
    import json

    from safetensors.torch import save_file

    old = ShadowLLMPredictor(c, 8, 1, torch.float32, "cpu")
    head = old.header()
    head.pop("input_site")
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"shadowbench": json.dumps(head)})
    assert load_predictor(tmp_path / "old.safetensors", c, dtype=torch.float32).input_site == "attn0"
    with pytest.raises(ValueError, match="shadowllm_input must be one of"):
        train_predictor("shadowllm", c, synthetic(c), "plainact", epochs=1, shadowllm_input="mlp")
    with pytest.raises(ValueError, match="DejaVu predictor reads each layer"):
        train_predictor("dejavu", c, synthetic(c), "plainact", epochs=1, shadowllm_input="residual")


def test_shadowllm_residual_mode_observes_only_layer_one_input():
    from models.modes import ShadowLLM

    from helpers import tiny_decoder

    model = tiny_decoder("llama")
    mode = ShadowLLM(0.5, "random", "local", "token", hidden=8, input_site="residual").bind(model)
    assert mode.observes("input", 1) and not mode.observes("input", 2) and not mode.observes("attn_out", 0)
    attn = ShadowLLM(0.5, "random", "local", "token", hidden=8).bind(model)
    assert attn.observes("attn_out", 0) and not attn.observes("input", 1)
    assert mode.describe()["input_site"] == "residual" and attn.describe()["input_site"] == "attn0"


def test_head_share_weighs_heads_and_neurons_and_is_part_of_the_case(tmp_path, capsys):
    """``head_share`` None is one MSE over every output; a number weighs the heads' mean squared error by it and the
    neurons' by the rest; bad values are refused by name; the share is part of a training case's key."""
    import json

    from bench.cli import build_parser, main
    from models.loading import TINY_RANDOM
    from models.train import target_loss

    g = torch.Generator().manual_seed(0)
    h, n = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 24, generator=g)
    yh, yn = torch.zeros_like(h), torch.zeros_like(n)
    every = (h.pow(2).sum() + n.pow(2).sum()) / (3 * 2 * (4 + 24))
    torch.testing.assert_close(target_loss(None)(h, n, yh, yn), every)
    torch.testing.assert_close(target_loss(0.25)(h, n, yh, yn), 0.25 * h.pow(2).mean() + 0.75 * n.pow(2).mean())
    for bad in (0, 1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="head_share must be"):
            target_loss(bad)
    p = build_parser()
    assert p.parse_args(["train-stream"]).head_share is None
    assert p.parse_args(["train", "--data", "d", "--head-share", "units"]).head_share is None
    assert p.parse_args(["train-stream", "--head-share", "0.5"]).head_share == 0.5
    with pytest.raises(SystemExit):
        p.parse_args(["train-stream", "--head-share", "1"])
    assert "--head-share must be in (0, 1), got 1.0 (or 'units')" in capsys.readouterr().err

    argv = ["train-stream", "--model", TINY_RANDOM, "--tasks", "", "--wikitext-tokens", "400", "--context", "48",
            "--epochs", "1", "--hidden", "16", "--batch", "64", "--pool-tokens", "200", "--eval-rows", "50", "--kind",
            "shadowllm", "--out", str(tmp_path / "p"), "--results", str(tmp_path / "rows.jsonl"), "--no-progress"]
    assert main(argv) == 0 and main(argv + ["--head-share", "0.5"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    shares = {r["extra"]["case_key"]: r["extra"]["settings"].get("head_share") for r in rows}
    assert sorted(shares.values(), key=str) == [0.5, None]  # two cases; the default keeps older rows' key
    assert main(argv + ["--head-share", "0.5"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("streamed", [False, True])
def test_staged_shadowllm_trains_on_each_stage_input_and_folds_each_scaling(tmp_path, streamed):
    """stages (1, 3): the second net reads layer 3's input and scores layer 3; each stage's standardisation folds
    into its own first layer; the file keeps the stages, the training rows' settings too."""
    from models.predictors import ShadowLLMPredictor
    from models.train import _predictor_input

    c = cfg()
    t = synthetic(c)
    x = _predictor_input(t, "shadowllm", True, 1, (1, 3))
    assert torch.equal(x[:, 0], t["inputs"][:, 1]) and torch.equal(x[:, 1], t["inputs"][:, 3])
    x = x * torch.logspace(-1, 2, c.hidden)
    want = _folds_exactly(ShadowLLMPredictor(c, 8, 1, torch.float32, "cpu", input_site="residual", stages=(1, 3)), x)
    assert want[0].shape == (len(x), 3, c.n_heads) and want[1].shape == (len(x), 3, c.ffn)
    res = _residual_trained(streamed, c, t, stages=(1, 3))
    assert res.predictor.stages == (1, 3)
    loaded = load_predictor(res.predictor.save(tmp_path / "p.safetensors"), res.predictor.cfg, dtype=torch.float32)
    assert loaded.stages == (1, 3)
    with pytest.raises(ValueError, match="stages split a ShadowLLM predictor"):
        train_predictor("dejavu", c, t, "plainact", epochs=1, stages=(1, 3))
    with pytest.raises(ValueError, match="stages must be increasing"):
        train_predictor("shadowllm", c, t, "plainact", epochs=1, shadowllm_input="residual", stages=(1, 9))


def test_train_command_takes_stages(tmp_path, monkeypatch):
    import json

    from bench.cli import main
    from models.loading import TINY_RANDOM, load_model

    crit = tmp_path / "crit"
    assert main(["collect", "--model", TINY_RANDOM, "--tasks", "copa", "--per-task", "8", "--per-token", "--criteria",
                 "l2norm", "--out", str(crit), "--no-progress"]) == 0
    assert main(["train", "--data", str(crit), "--kind", "shadowllm", "--criterion", "l2norm", "--epochs", "1",
                 "--hidden", "8", "--stages", "1,2", "--out", str(tmp_path / "p"), "--results",
                 str(tmp_path / "t.jsonl"), "--no-progress"]) == 0
    pred = load_predictor(tmp_path / "p" / "shadowllm-l2norm.safetensors", load_model(TINY_RANDOM).cfg)
    assert pred.stages == (1, 2)
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows[0]["extra"]["settings"]["stages"] == [1, 2]
    with pytest.raises(SystemExit):
        main(["train", "--data", str(crit), "--stages", "1,x"])
    # its quality rows name the stages, and so does the quality table's label
    from bench.quality import quality_table

    q = tmp_path / "q.jsonl"
    assert main(["quality", "--model", TINY_RANDOM, "--modes", "shadowllm", "--policy", "local", "--criteria",
                 "l2norm", "--sparsity", "0.5", "--tasks", "", "--ppl-tokens", "200", "--context", "64", "--stride",
                 "32", "--predictors-dir", str(tmp_path / "p"), "--out", str(q), "--no-progress"]) == 0
    rows = [json.loads(line) for line in q.read_text().splitlines()]
    assert [r["extra"]["shadowllm_stages"] for r in rows] == ["1,2"]
    assert "shadowllm residual-in stages:1,2" in quality_table(rows)
    # each layer's neurons above a threshold calibrated on WikiText-2 validation: a case of its own, labelled
    assert main(["quality", "--model", TINY_RANDOM, "--modes", "shadowllm", "--policy", "local", "--criteria",
                 "l2norm", "--sparsity", "0.5", "--tasks", "", "--ppl-tokens", "200", "--context", "64", "--stride",
                 "32", "--predictors-dir", str(tmp_path / "p"), "--out", str(q), "--no-progress", "--neuron-rule",
                 "threshold", "--calib-tokens", "256"]) == 0
    rows = [json.loads(line) for line in q.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["extra"]["neuron_rule"] == "threshold" and "neuron_rule" not in rows[0]["extra"]
    assert rows[1]["extra"]["neuron_calibration"] == "WikiText-2 validation, 256 tokens, windows of 64"
    assert 0.2 < rows[1]["extra"]["neuron_kept_share"] < 0.8  # aimed at 0.5 on other text
    assert rows[1]["value"] != rows[0]["value"]
    assert "stages:1,2 neurons:threshold" in quality_table(rows)
    # the oracle under the same rule (its ceiling: a per-token count chosen from the dense |activation|); the
    # calibration text is scored once for both sparsities, and each gets its own thresholds
    import models.sparse_forward as sf

    scored = []
    real = sf.neuron_calibration_scores
    monkeypatch.setattr(sf, "neuron_calibration_scores", lambda *a, **k: scored.append(1) or real(*a, **k))
    assert main(["quality", "--model", TINY_RANDOM, "--modes", "oracle", "--criteria", "l2norm", "--policy", "local",
                 "--sparsity", "0.3,0.5",
                 "--tasks", "", "--ppl-tokens", "200", "--context", "64", "--stride", "32", "--out", str(q),
                 "--no-progress", "--neuron-rule", "threshold", "--calib-tokens", "256"]) == 0
    assert len(scored) == 1
    rows = [json.loads(line) for line in q.read_text().splitlines()]
    assert [(r["mode"], r["sparsity"], r["extra"]["neuron_rule"]) for r in rows[-2:]] == [
        ("oracle", 0.3, "threshold"), ("oracle", 0.5, "threshold")]
    assert 0.55 < rows[-2]["extra"]["neuron_kept_share"] < 0.85 and 0.2 < rows[-1]["extra"]["neuron_kept_share"] < 0.8
    assert "oracle neurons:threshold" in quality_table(rows)
    # a global budget has no per-layer threshold: said before the model loads
    with pytest.raises(SystemExit, match="oracle and shadowllm need policy 'local'; got policies"):
        main(["quality", "--model", TINY_RANDOM, "--modes", "static,oracle,shadowllm", "--policy", "global,local",
              "--neuron-rule", "threshold", "--tasks", "", "--out", str(q)])
