import pytest

from bench import cli, latency
from bench.results import SCHEMA


def run(tmp_path, modes, **kw):
    return latency.run_latency(["tiny"], modes, [0.5], [6], ["token", "prompt"], prompt_len=5,
                               out_path=tmp_path / "l.jsonl", progress=False, **kw)


def test_sweep_rows_and_resume(tmp_path):
    rows = run(tmp_path, ["dense", "shadowllm", "hf"])
    assert rows and all(set(SCHEMA) <= set(r) for r in rows)
    assert {r["status"] for r in rows} == {"ok"}
    cases = {(r["mode"], r["policy"], r["extra"]["granularity"]) for r in rows}
    assert cases == {("dense", None, None), ("hf", None, None), ("shadowllm", "global", "token"),
                     ("shadowllm", "global", "prompt"), ("shadowllm", "local", "token"),
                     ("shadowllm", "local", "prompt")}
    tok = [r for r in rows if r["metric"] == "token_ms"]
    assert all(r["value"] > 0 and r["extra"]["token_ms_steps"] == 5 for r in tok if r["mode"] != "hf")
    share = {r["extra"]["granularity"]: r["value"] for r in rows if r["metric"] == "predictor_share"}
    assert share["prompt"] == 0.0 and share["token"] > 0
    sb = {(r["mode"], r["extra"]["granularity"]): r["value"] for r in rows
          if r["metric"] == "step_bytes" and r["policy"] in (None, "global")}
    # sparse steps read fewer weight bytes; a per-token predictor adds its own
    assert sb[("shadowllm", "prompt")] < sb[("dense", None)]
    assert sb[("shadowllm", "token")] > sb[("shadowllm", "prompt")]
    assert run(tmp_path, ["dense", "shadowllm", "hf"]) == []  # resumed


def test_failing_case_is_recorded_and_sweep_goes_on(tmp_path, monkeypatch):
    real = latency.run_mode_case

    def broken(model, case, **kw):
        if case.mode == "static":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, case, **kw)

    monkeypatch.setattr(latency, "run_mode_case", broken)
    rows = run(tmp_path, ["static", "dense"])
    err = [r for r in rows if r["status"] == "error"]
    assert len(err) == 1 and "simulated" in err[0]["extra"]["error"]
    assert any(r["mode"] == "dense" and r["metric"] == "token_ms" for r in rows)


def test_cli_latency(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert cli.main(["latency", "--modes", "dense,dejavu", "--gen", "4", "--prompt", "4", "--granularity", "token",
                     "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "dejavu" in text and "rows appended" in text
    with pytest.raises(SystemExit, match="unknown mode"):
        cli.main(["latency", "--modes", "turbo", "--out", str(out)])
    with pytest.raises(SystemExit):
        cli.main(["latency", "--sparsity", "1.5", "--out", str(out)])
    with pytest.raises(ValueError, match="unknown model"):
        latency.build_model("opt-7b", None, "cpu")


def test_llama_runs_every_mode(tmp_path):
    rows = latency.run_latency(["tiny-llama"], ["dense", "static", "dejavu", "shadowllm", "hf"], [0.5], [4],
                               ["token"], prompt_len=5, out_path=tmp_path / "l.jsonl", progress=False,
                               shadowllm_policies=("global",))
    assert {r["status"] for r in rows} == {"ok"}
    tok = {r["mode"] for r in rows if r["metric"] == "token_ms"}
    assert tok == {"dense", "static", "dejavu", "shadowllm", "hf"}
    sb = {r["mode"]: r["value"] for r in rows if r["metric"] == "step_bytes"}
    assert sb["static"] < sb["dense"]


def test_kv_rule_always_reads_every_groups_keys_and_values(tmp_path, capsys):
    """Llama under kv_rule "always": the sparse modes' steps read the key/value rows of every group (more bytes than
    "skip" at the same budget); the rule is in each row and in the resume key; OPT refuses it in one line."""
    out = tmp_path / "l.jsonl"
    common = dict(prompt_len=5, out_path=out, progress=False, shadowllm_policies=("local",))
    skip = latency.run_latency(["tiny-llama"], ["dense", "static"], [0.75], [4], ["token"], **common)
    always = latency.run_latency(["tiny-llama"], ["dense", "static"], [0.75], [4], ["token"], kv_rule="always",
                                 **common)
    assert {r["mode"] for r in always} == {"static"}  # dense is the same step under either rule: done
    sb = lambda rows: next(r for r in rows if r["metric"] == "step_bytes" and r["mode"] == "static")
    assert sb(always)["extra"]["kv_rule"] == "always" and sb(skip)["extra"]["kv_rule"] == "skip"
    assert sb(always)["value"] > sb(skip)["value"]
    assert latency.run_latency(["tiny-llama"], ["static"], [0.75], [4], ["token"], kv_rule="always", **common) == []
    with pytest.raises(SystemExit, match="--kv-rule always decodes on grouped-query models"):
        cli.main(["latency", "--models", "tiny", "--kv-rule", "always", "--out", str(out)])


def test_batch_union_reads_more_than_one_sequences_plan(tmp_path):
    """Batch 3 with the union rule: the rows say so, the step reads at least the mean rule's bytes (the
    union holds k or more units a layer), and the two rules are separate cases of one results file."""
    kw = dict(batch=3)
    mean = run(tmp_path, ["shadowllm"], **kw)
    union = run(tmp_path, ["shadowllm"], batch_rule="union", **kw)
    assert union and all(r["extra"]["batch_rule"] == "union" for r in union)
    sb = lambda rows: {(r["policy"], r["extra"]["granularity"]): r["value"] for r in rows
                       if r["metric"] == "step_bytes"}
    for key, nbytes in sb(union).items():
        assert nbytes >= sb(mean)[key]
    assert sum(sb(union).values()) > sum(sb(mean).values())
    with pytest.raises(ValueError, match="batch_rule must be one of"):
        run(tmp_path, ["shadowllm"], batch_rule="max")


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path, capsys):
    cfg = tmp_path / "sweep.toml"
    out = tmp_path / "c.jsonl"
    cfg.write_text(f'[latency]\nmodels = ["tiny"]\nmodes = ["dense", "static"]\nsparsity = [0.5, 0.7]\n'
                   f'gen = [4]\nprompt = 4\ngranularity = "token"\nno_progress = true\nout = "{out}"\n'
                   '[kernels]\nops = ["fc1"]\n')
    assert cli.main(["latency", "--config", str(cfg), "--sparsity", "0.6"]) == 0
    rows = [r for r in __import__("bench.results", fromlist=["x"]).RowWriter(out).existing()
            if r["metric"] == "token_ms"]
    assert {(r["mode"], r["sparsity"]) for r in rows} == {("dense", 0.0), ("static", 0.6)}
    capsys.readouterr()
    for text, match in (('[latency]\nturbo = 1\n', "unknown key 'turbo'.*known:.*sparsity"),
                        ('[latency]\nno_progress = "yes"\n', "switch"),
                        ('[report]\nout = "x"\n', "none for 'latency'"),
                        ('models = [\n', "not valid TOML")):
        cfg.write_text(text)
        with pytest.raises(SystemExit, match=match):
            cli.main(["latency", "--config", str(cfg)])
    with pytest.raises(SystemExit, match="not a file"):
        cli.main(["latency", "--config", str(tmp_path / "missing.toml")])


def test_bundled_sweep_config_parses():
    from pathlib import Path

    from bench.config import config_argv

    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices
    path = Path(__file__).parents[1] / "perf" / "sweep-opt.toml"
    for command in ("latency", "kernels"):
        argv = [command, *config_argv(subs[command], command, path)]
        args = parser.parse_args(argv)
        assert args.out == "runs/" + command + ".jsonl"


def test_dense_gemv_triton_rows_and_errors(tmp_path):
    """--dense-gemv triton: rows say so, resume keeps cuBLAS and own-GEMV rows apart (OPT and Llama), and a bad
    engine name is refused."""
    out = tmp_path / "g.jsonl"
    kw = dict(prompt_len=4, out_path=out, progress=False, shadowllm_policies=("global",))
    a = latency.run_latency(["tiny"], ["dense"], [0.5], [4], ["token"], **kw)
    b = latency.run_latency(["tiny"], ["dense"], [0.5], [4], ["token"], dense_gemv="triton", **kw)
    assert {r["extra"]["dense_gemv"] for r in a} == {"cublas"} and {r["extra"]["dense_gemv"] for r in b} == {"triton"}
    assert any(r["metric"] == "token_ms" and r["status"] == "ok" for r in b)
    assert latency.run_latency(["tiny"], ["dense"], [0.5], [4], ["token"], dense_gemv="triton", **kw) == []
    llama = latency.run_latency(["tiny-llama"], ["dense"], [0.5], [4], ["token"], dense_gemv="triton", **kw)
    assert llama and {r["status"] for r in llama} == {"ok"} and {r["extra"]["dense_gemv"] for r in llama} == {"triton"}
    with pytest.raises(ValueError, match="dense_gemv must be one of"):
        latency.run_latency(["tiny"], ["dense"], [0.5], [4], ["token"], dense_gemv="cutlass", **kw)
    assert "+owngemv" in latency.summary_table(b)


def test_norm_fold_off_rows_and_resume(tmp_path):
    """--no-norm-fold: rows say so and use the unfused ops (an add + norm kernel, then the GEMV); resume keeps
    them apart from the fused rows."""
    out = tmp_path / "n.jsonl"
    kw = dict(prompt_len=4, out_path=out, progress=False, shadowllm_policies=("global",))
    a = latency.run_latency(["tiny"], ["static"], [0.5], [4], ["token"], **kw)
    b = latency.run_latency(["tiny"], ["static"], [0.5], [4], ["token"], norm_fold=False, **kw)
    assert {r["extra"]["norm_fold"] for r in a} == {True} and {r["extra"]["norm_fold"] for r in b} == {False}
    assert any(r["metric"] == "token_ms" and r["status"] == "ok" for r in b)
    assert latency.run_latency(["tiny"], ["static"], [0.5], [4], ["token"], norm_fold=False, **kw) == []
    assert "+unfusednorm" in latency.summary_table(b) and "+unfusednorm" not in latency.summary_table(a)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_unfused_norm_ops_decode_like_the_fold(family):
    """models.ops.unfused_norms (what --no-norm-fold runs) computes what the fused norm GEMVs do (OPT: LayerNorm
    into qkv and fc1; Llama: RMSNorm into qkv and the SwiGLU pair)."""
    import torch

    from models.generate import Generator
    from models.modes import Static
    from models.ops import TORCH, unfused_norms

    from helpers import random_importance, teacher_forced, tiny_decoder

    model = tiny_decoder(family)
    if family == "opt":
        model.set_dense_gemv("triton")
    tokens = torch.randint(0, model.cfg.vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    logits = [teacher_forced(Generator(model, Static(random_importance(model.cfg), 0.5, "global"), batch=2,
                                       max_len=12, backend=ops), tokens, 6) for ops in (TORCH, unfused_norms(TORCH))]
    assert float((logits[0] - logits[1]).norm() / logits[1].norm()) <= 1e-5


def test_auto_dense_gemv_takes_the_own_gemv_where_the_fc2_copy_fits(monkeypatch):
    """``auto`` (the default): our GEMV for OPT on a GPU when the weights and the natural-layout fc2 copy leave room
    (OPT-13B on 80 GB yes, OPT-30B no, OPT-30B over two ranks yes), ours for Llama on a GPU (no copy), cuBLAS on the
    CPU; rows of the default record the engine used."""
    import torch

    props = type("Props", (), {"total_memory": 80 << 30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    fp16 = torch.float16
    pick = lambda name, world=1: latency.resolve_dense_gemv("auto", name, fp16, "cuda", world)
    assert pick("opt-13b") == "triton" and pick("opt-6.7b") == "triton"
    assert pick("opt-30b") == "cublas" and pick("opt-30b", 2) == "triton"
    assert pick("llama-2-7b") == "triton" and pick("smollm2-135m") == "triton"
    assert latency.resolve_dense_gemv("auto", "llama-2-7b", fp16, "cpu") == "cublas"
    assert latency.resolve_dense_gemv("auto", "opt-13b", fp16, "cpu") == "cublas"
    assert latency.resolve_dense_gemv("triton", "opt-30b", fp16, "cuda") == "triton"  # asked for: taken as is
    assert cli.build_parser().parse_args(["latency"]).dense_gemv == "auto"


def test_resume_key_is_one_list_for_rows_and_cases_and_keeps_dejavu_variants_apart(tmp_path):
    """The key a row resumes by and the key of the case that wrote it are the same (one field list for both), every
    mode's rows included; DejaVu's MLP-input and layer-input predictors are two cases; a DejaVu row older than the
    field counts as the layer-input case it timed."""
    rows = run(tmp_path, ["dense", "static", "dejavu", "shadowllm"])
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["extra"].get("neuron_input") for r in ok if r["mode"] == "dejavu"} == {"mlp"}
    assert {r["extra"].get("neuron_input") for r in ok if r["mode"] != "dejavu"} == {None}
    dejavu_rows = [r for r in ok if r["mode"] == "dejavu"]
    assert run(tmp_path, ["dense", "static", "dejavu", "shadowllm"]) == []
    layer = run(tmp_path, ["dejavu"], neuron_input="layer")
    assert layer and {r["extra"]["neuron_input"] for r in layer} == {"layer"}
    assert run(tmp_path, ["dejavu"], neuron_input="layer") == []
    old = {**dejavu_rows[0], "extra": {k: v for k, v in dejavu_rows[0]["extra"].items() if k != "neuron_input"}}
    assert latency._row_settings(old)["neuron_input"] == "layer"
    assert set(latency._row_settings(dejavu_rows[0])) == set(latency.RESUME_FIELDS)
    with pytest.raises(ValueError, match="neuron_input must be one of"):
        run(tmp_path, ["dejavu"], neuron_input="attn")


def test_shadowllm_input_is_a_case_of_its_own(tmp_path):
    """ShadowLLM's random predictor reads the residual stream entering layer 1 by default (as `train` makes it);
    layer 0's attention output is a separate case; a ShadowLLM row older than the field counts as the attn0 case it
    timed; a bad input is refused by name."""
    rows = [r for r in run(tmp_path, ["shadowllm"]) if r["status"] == "ok"]
    assert rows and {r["extra"]["shadowllm_input"] for r in rows} == {"residual"}  # the bound predictor's own site
    assert run(tmp_path, ["shadowllm"]) == []
    attn0 = run(tmp_path, ["shadowllm"], shadowllm_input="attn0")
    assert attn0 and {r["extra"]["shadowllm_input"] for r in attn0} == {"attn0"}
    assert run(tmp_path, ["shadowllm"], shadowllm_input="attn0") == []
    dense = [r for r in run(tmp_path, ["dense"]) if r["status"] == "ok"]
    assert {r["extra"].get("shadowllm_input") for r in dense} == {None}
    old = {**rows[0], "extra": {k: v for k, v in rows[0]["extra"].items() if k != "shadowllm_input"}}
    assert latency._row_settings(old)["shadowllm_input"] == "attn0"
    with pytest.raises(ValueError, match="shadowllm_input must be one of"):
        run(tmp_path, ["shadowllm"], shadowllm_input="layer0")
    assert cli.build_parser().parse_args(["latency"]).shadowllm_input == "residual"


def test_staged_shadowllm_is_a_case_of_its_own(tmp_path):
    """A staged random ShadowLLM predictor (`--shadowllm-stages 1,2`): its rows say so and resume apart from the one
    predictor's; it reads more predictor bytes (a second first layer); under a global budget its case is an error
    row naming why, and the sweep goes on."""
    one = [r for r in run(tmp_path, ["shadowllm"], shadowllm_policies=("local",)) if r["status"] == "ok"]
    staged = run(tmp_path, ["shadowllm"], shadowllm_policies=("local",), shadowllm_stages="1,2")
    assert staged and {r["status"] for r in staged} == {"ok"}
    assert {r["extra"]["shadowllm_stages"] for r in staged} == {"1,2"}
    pb = lambda rows: {r["extra"]["granularity"]: r["extra"]["predictor_bytes"] for r in rows
                       if r["metric"] == "step_bytes"}
    assert all(pb(staged)[g] > pb(one)[g] for g in pb(one))
    assert run(tmp_path, ["shadowllm"], shadowllm_policies=("local",), shadowllm_stages="1,2") == []
    glob = run(tmp_path, ["shadowllm"], shadowllm_policies=("global",), shadowllm_stages="1,2")
    assert glob and {r["status"] for r in glob} == {"error"}
    assert all("global top-k needs every layer" in r["extra"]["error"] for r in glob)
    with pytest.raises(ValueError, match="shadowllm_stages must be layer indices"):
        run(tmp_path, ["shadowllm"], shadowllm_stages="1,x")
    assert cli.build_parser().parse_args(["latency", "--shadowllm-stages", "1,2"]).shadowllm_stages == "1,2"


def test_threshold_path_is_a_case_of_its_own(tmp_path):
    """The threshold mode's projections at batch 1 run fused (default) or select-then-gather: rows record which and
    resume apart; a threshold row older than the field counts as the select path it timed; the module's switch is
    restored after the sweep; a bad path is refused by name."""
    from shadow_kernels import threshold as thr

    fused = [r for r in run(tmp_path, ["threshold"]) if r["status"] == "ok"]
    assert fused and {r["extra"]["threshold_path"] for r in fused} == {"fused"}
    assert run(tmp_path, ["threshold"]) == []
    prev = thr.set_fused(True)
    sel = run(tmp_path, ["threshold"], threshold_path="select")
    assert thr.set_fused(prev) is True  # the sweep set it back
    assert sel and {r["status"] for r in sel} == {"ok"} and {r["extra"]["threshold_path"] for r in sel} == {"select"}
    old = {**fused[0], "extra": {k: v for k, v in fused[0]["extra"].items() if k != "threshold_path"}}
    assert latency._row_settings(old)["threshold_path"] == "select"
    dense = [r for r in run(tmp_path, ["dense"]) if r["status"] == "ok"]
    assert {latency._row_settings(r)["threshold_path"] for r in dense} == {None}
    with pytest.raises(ValueError, match="threshold_path must be one of"):
        run(tmp_path, ["threshold"], threshold_path="both")
    assert cli.build_parser().parse_args(["latency", "--threshold-path", "select"]).threshold_path == "select"


def test_neuron_threshold_rule_is_a_case_of_its_own(tmp_path):
    """`--neuron-rule threshold` times DejaVu and ShadowLLM keeping each layer's neurons above a threshold (random
    predictors: calibrated on random tokens, rows say so): rows record the rule and resume apart from top-k; the
    dense rows are the same case either way; a global ShadowLLM budget is an error row naming why."""
    top = [r for r in run(tmp_path, ["dense", "dejavu"]) if r["status"] == "ok"]
    thr = run(tmp_path, ["dense", "dejavu", "shadowllm"], neuron_rule="threshold", shadowllm_policies=("local",))
    assert thr and {r["status"] for r in thr} == {"ok"} and {r["mode"] for r in thr} == {"dejavu", "shadowllm"}
    assert {r["extra"]["neuron_rule"] for r in thr} == {"threshold"}
    assert {r["extra"]["neuron_calibration"] for r in thr} == {"random tokens"}
    assert all("neuron_rule" not in r["extra"] for r in top)
    assert run(tmp_path, ["dejavu"], neuron_rule="threshold") == []
    glob = run(tmp_path, ["shadowllm"], neuron_rule="threshold", shadowllm_policies=("global",))
    assert glob and {r["status"] for r in glob} == {"error"}
    assert all("needs policy 'local' and one rank" in r["extra"]["error"] for r in glob)
    with pytest.raises(ValueError, match="neuron_rule must be one of"):
        run(tmp_path, ["dejavu"], neuron_rule="adaptive")
    assert cli.build_parser().parse_args(["latency", "--neuron-rule", "threshold"]).neuron_rule == "threshold"
