"""``shadowbench pareto``: every configuration's quality and latency rows carry one key and join."""

import json

from bench import cli
from bench.pareto import join
from models.loading import TINY_RANDOM


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pareto_joins_quality_and_latency_of_the_same_configuration(tmp_path, capsys, monkeypatch):
    crit, pred, th = tmp_path / "crit", tmp_path / "pred", tmp_path / "th.safetensors"
    th_file = th
    assert cli.main(["collect", "--model", TINY_RANDOM, "--tasks", "copa", "--per-task", "8", "--criteria", "l2norm",
                     "--out", str(crit), "--no-progress"]) == 0
    assert cli.main(["train", "--data", str(crit), "--kind", "shadowllm,dejavu", "--criterion", "l2norm", "--epochs",
                     "2", "--hidden", "16", "--out", str(pred), "--results", str(tmp_path / "t.jsonl"),
                     "--no-progress"]) == 0
    assert cli.main(["calibrate", "--model", TINY_RANDOM, "--sparsity", "0.5", "--tokens", "300", "--context", "100",
                     "--out", str(th), "--no-progress"]) == 0
    q, lat = tmp_path / "q.jsonl", tmp_path / "l.jsonl"
    argv = ["pareto", "--model", TINY_RANDOM, "--modes", "dense,oracle,static,shadowllm,dejavu,threshold",
            "--sparsity", "0.5", "--ppl-tokens", "96", "--criteria-dir", str(crit), "--predictors-dir", str(pred),
            "--thresholds", str(th), "--prompt", "6", "--gen", "4", "--quality-out", str(q), "--latency-out",
            str(lat), "--no-progress"]
    import models.modes

    loads = []
    real = models.modes.load_predictor
    monkeypatch.setattr(models.modes, "load_predictor", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    assert cli.main(argv) == 0
    assert sorted(map(str, loads)) == sorted({str(p) for p in loads}) and len(loads) == 2  # each file loaded once
    qr, lr = rows(q), rows(lat)
    assert all(r["extra"].get("config_key") for r in qr + lr)
    recs = {o["mode"]: o for o in join(qr + lr)}
    assert set(recs) == {"dense", "oracle", "static", "shadowllm", "dejavu", "threshold"}
    for m in ("static", "shadowllm", "dejavu", "threshold"):  # scored and timed with the same files
        assert recs[m]["perplexity"] > 0 and recs[m]["token_ms"] > 0 and recs[m]["speedup"] > 0
    assert "token_ms" not in recs["oracle"]  # no decode step: no latency
    skipped = [r for r in lr if r["status"] == "skipped"]
    assert {r["mode"] for r in skipped} == {"oracle"} and all("no decode step" in r["extra"]["why"] for r in skipped)
    th = next(r for r in lr if r["mode"] == "threshold" and r["metric"] == "step_bytes")
    dense = next(r for r in lr if r["mode"] == "dense" and r["metric"] == "step_bytes")
    assert th["extra"]["thresholds"] == str(th_file) and th["value"] < dense["value"]
    trained = [r for r in lr if r["mode"] == "shadowllm" and r["metric"] == "token_ms"]
    assert trained[0]["extra"]["weights"] == "trained" and "shadowllm-l2norm" in trained[0]["extra"]["source"]
    n = len(qr), len(lr)
    assert cli.main(argv) == 0  # resumed: nothing new
    assert (len(rows(q)), len(rows(lat))) == n
    assert "speedup" in capsys.readouterr().out
    assert {r["extra"]["dense_gemv"] for r in lr} == {"cublas"}  # auto on the CPU
    # another dense engine: the same configurations timed again (not scored again), the rows saying which
    own = argv + ["--dense-gemv", "triton"]
    own[own.index("--modes") + 1] = "dense"
    assert cli.main(own) == 0
    assert len(rows(q)) == n[0]
    timed = [r for r in rows(lat)[n[1]:] if r["metric"] == "token_ms"]
    assert [(r["mode"], r["extra"]["dense_gemv"]) for r in timed] == [("dense", "triton")]
    n = len(qr), len(rows(lat))
    # the key/value rule and the granularity reach both the scored and the timed mode, and make new configurations
    variant = argv + ["--kv-rule", "always", "--granularity", "prompt"]
    variant[variant.index("--modes") + 1] = "shadowllm"
    assert cli.main(variant) == 0
    new = rows(q)[n[0]:] + rows(lat)[n[1]:]
    assert {r["kind"] for r in new} == {"quality", "latency"}
    for r in new:
        assert r["extra"]["kv_rule"] == "always" and r["extra"]["granularity"] == "prompt", r
    old_keys = {r["extra"]["config_key"] for r in qr + lr}
    assert not old_keys & {r["extra"]["config_key"] for r in new}
    rec = next(o for o in join(rows(q) + rows(lat)) if o.get("kv_rule") == "always")
    assert rec["granularity"] == "prompt" and rec["perplexity"] > 0 and rec["token_ms"] > 0
    assert "always prompt" in capsys.readouterr().out
    # the neuron threshold rule: calibrated in the scored part, and the timed decode step runs that very mode
    n = len(rows(q)), len(rows(lat))
    thr = argv + ["--neuron-rule", "threshold", "--calib-tokens", "256"]
    thr[thr.index("--modes") + 1] = "oracle,shadowllm"
    assert cli.main(thr) == 0
    new_q, new_l = rows(q)[n[0]:], rows(lat)[n[1]:]
    assert {r["mode"] for r in new_q} == {"oracle", "shadowllm"}
    assert all(r["extra"]["neuron_rule"] == "threshold" and 0 < r["extra"]["neuron_kept_share"] < 1 for r in new_q)
    assert not old_keys & {r["extra"]["config_key"] for r in new_q + new_l}
    recs = {o["mode"]: o for o in join(new_q + new_l)}
    assert recs["shadowllm"]["neuron_rule"] == "threshold" and recs["shadowllm"]["token_ms"] > 0
    assert recs["oracle"]["neuron_rule"] == "threshold" and "token_ms" not in recs["oracle"]
    assert "shadowllm neurons:threshold" in capsys.readouterr().out  # its line apart from top-k's


def test_report_draws_the_pareto_figure_and_speedup_table(tmp_path):
    from reports.html import build_report

    def row(kind, mode, metric, value, key, s=0.5, **extra):
        return {"kind": kind, "model": "m", "mode": mode, "criterion": None if mode == "dense" else "l2norm",
                "policy": None if mode == "dense" else "local", "sparsity": 0.0 if mode == "dense" else s,
                "metric": metric, "value": value, "unit": "", "device": "dev", "dtype": "fp32", "git_commit": "c",
                "status": "ok", "batch": 1, "prompt_len": 8, "gen_len": 4,
                "extra": {"config_key": key, "eval": "wikitext2", **extra}}

    rs = [row("quality", "dense", "perplexity", 20.0, "d"), row("latency", "dense", "token_ms", 10.0, "d"),
          row("quality", "shadowllm", "perplexity", 21.0, "a", 0.3), row("latency", "shadowllm", "token_ms", 8.0, "a",
                                                                         0.3),
          row("quality", "shadowllm", "perplexity", 24.0, "b"), row("latency", "shadowllm", "token_ms", 5.0, "b"),
          row("quality", "oracle", "perplexity", 20.5, "o"),
          # another key/value rule is a configuration of its own: a curve and a table row apart
          row("quality", "shadowllm", "perplexity", 22.0, "k", kv_rule="always"),
          row("latency", "shadowllm", "token_ms", 6.0, "k", kv_rule="always"),
          # timed again with dense layers on our kernels: its own records, over the dense step of that engine
          row("latency", "dense", "token_ms", 4.0, "d", dense_gemv="triton"),
          row("latency", "shadowllm", "token_ms", 5.0, "b", dense_gemv="triton")]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    out, drawn = build_report([path], tmp_path / "r.html")
    page = out.read_text()
    assert drawn["pareto"] == len(rs)
    # within 5% of dense ppl (<= 21): 10/8 = 1.25x; within 25% (<= 25): 10/5 = 2x
    # rows without an engine ran cuBLAS
    assert "shadowllm l2norm local dense:cublas</td><td>1.25x</td><td>1.25x</td><td>2.00x</td>" in page
    assert "shadowllm l2norm local kv:always dense:cublas</td><td>-</td><td>1.67x</td><td>1.67x</td>" in page
    assert "shadowllm l2norm local dense:ours</td><td>-</td><td>-</td><td>0.80x</td>" in page
    recs = {(o["mode"], o.get("dense_gemv"), o["sparsity"]) for o in join(rs) if o.get("speedup")}
    assert ("shadowllm", "triton", 0.5) in recs and ("shadowllm", "cublas", 0.5) in recs
    both = [o for o in join(rs) if o["mode"] == "shadowllm" and o["sparsity"] == 0.5 and o.get("kv_rule") is None]
    assert sorted((o["dense_gemv"], o["perplexity"], o["speedup"]) for o in both) == [("cublas", 24.0, 2.0),
                                                                                       ("triton", 24.0, 0.8)]
    assert "oracle l2norm local s=0.5 (ceiling)" in page
    # two predictor folders of one mode, one of them staged: curves and table rows apart, named by stages and folder
    src = lambda folder: {"source": f"/r/{folder}/shadowllm-l2norm.safetensors"}
    rs2 = rs + [row("quality", "shadowllm", "perplexity", 21.5, "st", shadowllm_stages="1,8", **src("st4")),
                row("latency", "shadowllm", "token_ms", 6.5, "st", **src("st4"))]
    rs2 = [dict(r, extra=dict(r["extra"], **src("one"))) if r["mode"] == "shadowllm" and r["extra"]["config_key"]
           in "abk" else r for r in rs2]
    rec = next(o for o in join(rs2) if o["mode"] == "shadowllm" and o.get("shadowllm_stages"))
    assert rec["source_folder"] == "st4" and rec["perplexity"] == 21.5 and rec["speedup"] == 10.0 / 6.5
    path.write_text("".join(json.dumps(r) + "\n" for r in rs2))
    page = build_report([path], tmp_path / "r2.html")[0].read_text()
    assert "shadowllm l2norm local stages:1,8 dense:cublas [st4]</td><td>-</td><td>1.54x</td>" in page
    assert "shadowllm l2norm local dense:cublas [one]</td><td>1.25x</td>" in page
