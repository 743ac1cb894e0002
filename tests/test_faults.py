"""Fault injection: what a user's results file looks like after a crash, a torn write or a bad input.

Every case here would lose or misreport results if the code were wrong: torn tails and unfinished cases are repaired
and redone on resume, SIGKILL at random points loses no finished case and duplicates none, read-only outputs and
corrupt input files fail before any work with one line naming them, a changed setting is a new case, the report never
overwrites its input, and the kernels propagate NaN as their references do.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench import cli
from bench.results import RowWriter, make_row
from models.loading import TINY_RANDOM

from conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]
LATENCY = ["latency", "--models", "tiny", "--modes", "dense,static,shadowllm", "--sparsity", "0.5", "--gen", "4",
           "--prompt", "5", "--granularity", "token", "--policy", "global", "--no-progress"]


def lines_of(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), "the file must end at a whole line"
    return [json.loads(line) for line in text.splitlines() if line.strip()]  # every line valid JSON


def cases_of(rows: list[dict]) -> Counter:
    """How many complete cases of each configuration the rows hold (a case = the rows of one write)."""
    groups: dict = {}
    for r in rows:
        e = r["extra"]
        groups.setdefault(e["case_id"], []).append(r)
    out: Counter = Counter()
    for rows_of_case in groups.values():
        assert len(rows_of_case) == rows_of_case[0]["extra"]["case_rows"], "an unfinished case was left in the file"
        r = rows_of_case[0]
        out[(r["kind"], r["mode"], r["policy"], r["sparsity"], r["extra"].get("granularity"),
             r["extra"].get("eval"), r["gen_len"])] += 1
    return out


@pytest.fixture(scope="module")
def complete_latency(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lat") / "full.jsonl"
    assert cli.main([*LATENCY, "--out", str(path)]) == 0
    return path


def test_a_torn_last_line_is_cut_and_its_case_redone(complete_latency, tmp_path, capsys):
    full = complete_latency.read_text().splitlines(keepends=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(full[:5]) + full[5][: len(full[5]) // 2])
    assert cli.main([*LATENCY, "--out", str(torn)]) == 0
    assert "repaired" in capsys.readouterr().err
    rows = lines_of(torn)
    assert cases_of(rows) == cases_of(lines_of(complete_latency))  # every case once, none lost, none twice
    assert cli.main(["report", str(torn), "-o", str(tmp_path / "r.html")]) == 0


def test_a_case_cut_between_its_rows_is_redone(complete_latency, tmp_path):
    rows = lines_of(complete_latency)
    last = rows[-1]["extra"]["case_id"]
    n_last = sum(r["extra"]["case_id"] == last for r in rows)
    assert n_last > 1
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))  # the last case lost its last two rows
    assert RowWriter(cut).existing() == rows[: len(rows) - n_last]  # its other rows do not count as done
    assert cli.main([*LATENCY, "--out", str(cut)]) == 0
    got = lines_of(cut)
    assert cases_of(got) == cases_of(rows)
    redone = [r for r in got if r["mode"] == rows[-1]["mode"] and r["policy"] == rows[-1]["policy"]]
    assert {r["metric"] for r in redone} == {r["metric"] for r in rows if r["extra"]["case_id"] == last}


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_loses_and_duplicates_nothing(tmp_path):
    """A longer sweep in a subprocess, killed three times at random points (each after the run has written at least
    one more case), then resumed to the end: the file holds exactly the cases of an uninterrupted run, each once,
    every line valid."""
    argv = [*LATENCY, "--modes", "dense,static,dejavu,shadowllm", "--sparsity", "0.2,0.4,0.6,0.8", "--gen", "8,16",
            "--granularity", "token,prompt"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cmd(path):
        return [sys.executable, "-m", "bench.cli", *argv, "--out", str(path)]

    t0 = time.time()
    assert subprocess.run(cmd(tmp_path / "whole.jsonl"), cwd=ROOT, env=env, capture_output=True).returncode == 0
    want = cases_of(lines_of(tmp_path / "whole.jsonl"))
    per_case = (time.time() - t0) / sum(want.values())
    path = tmp_path / "killed.jsonl"
    rng = random.Random(7)
    partial = []

    def size():  # (the writer's probe of a new path appears and is removed again: no exists-then-stat)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    for _ in range(3):
        # killed at a random point after the run has written a case (the machine's load does not move the kill past
        # the end of the sweep): within that case's write, between cases, or inside the next case's work
        before = size()
        proc = subprocess.Popen(cmd(path), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while size() == before and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 2.0) * per_case)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():
            partial.append(sum(cases_of(RowWriter(path).existing()).values()))
    assert any(0 < n < sum(want.values()) for n in partial), f"no kill landed mid-sweep: {partial} of {want}"
    assert subprocess.run(cmd(path), cwd=ROOT, env=env, capture_output=True).returncode == 0
    assert cases_of(lines_of(path)) == want


@pytest.mark.parametrize("out", ["/proc/shadowbench-results/rows.jsonl", "FILE/rows.jsonl"])
def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path, out):
    if out.startswith("FILE"):
        (tmp_path / "FILE").write_text("a file, not a folder")
        out = str(tmp_path / out)
    t0 = time.time()
    with pytest.raises(SystemExit, match="cannot write results to"):
        cli.main([*LATENCY, "--models", "opt-13b", "--out", out])  # would build a 26 GB model first
    assert time.time() - t0 < 5
    with pytest.raises(SystemExit, match="cannot write results to"):
        cli.main(["quality", "--model", TINY_RANDOM, "--modes", "dense", "--no-ppl", "--tasks", "copa", "--out", out])


def test_a_folder_given_as_results_file_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="is a folder; expected a .jsonl file"):
        cli.main([*LATENCY, "--out", str(tmp_path)])


def test_report_never_overwrites_its_input(complete_latency, tmp_path):
    copy = tmp_path / "acc.jsonl"
    copy.write_text(complete_latency.read_text())
    before = copy.read_text()
    with pytest.raises(SystemExit, match="would overwrite it"):
        cli.main(["report", str(copy), "-o", str(copy)])
    with pytest.raises(SystemExit, match="would overwrite it"):
        cli.main(["report", str(tmp_path), "-o", str(tmp_path / "other.jsonl")])
    assert copy.read_text() == before
    assert cli.main(["report", str(copy), "-o", str(tmp_path)]) == 0  # a folder: report.html in it
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_report_leaves_out_rows_without_a_metric_with_a_warning(complete_latency, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(complete_latency.read_text() + json.dumps({"kind": "latency", "model": "tiny"}) + "\n")
    with pytest.warns(UserWarning, match="without 'kind', 'metric' and 'value'"):
        assert cli.main(["report", str(mixed), "-o", str(tmp_path / "r.html")]) == 0


# ---------------------------------------------------------------- quality: a changed setting is a new case
def quality(tmp_path, *extra):
    return ["quality", "--model", TINY_RANDOM, "--modes", "dense", "--tasks", "copa", "--no-ppl", "--no-progress",
            "--out", str(tmp_path / "q.jsonl"), *extra]


def test_quality_reruns_a_case_whose_settings_changed(tmp_path, capsys):
    assert cli.main(quality(tmp_path, "--limit", "2")) == 0
    assert cli.main(quality(tmp_path, "--limit", "3")) == 0
    out = capsys.readouterr().out
    rows = [r for r in lines_of(tmp_path / "q.jsonl") if r["metric"] == "acc"]
    assert sorted(r["extra"]["examples"] for r in rows) == [2, 3]
    assert "2 rows appended" in out.splitlines()[-1] and "(0 found done" in out.splitlines()[-1]
    assert cli.main(quality(tmp_path, "--limit", "3")) == 0  # the same settings: found done, nothing appended
    assert "0 rows appended" in capsys.readouterr().out
    assert len(lines_of(tmp_path / "q.jsonl")) == 4
    assert cli.main(quality(tmp_path, "--limit", "3", "--context-mode", "dense")) == 0
    assert len(lines_of(tmp_path / "q.jsonl")) == 6


def test_a_torn_quality_file_is_repaired_on_resume(tmp_path, capsys):
    assert cli.main(quality(tmp_path, "--limit", "2")) == 0
    path = tmp_path / "q.jsonl"
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:40])
    assert cli.main(quality(tmp_path, "--limit", "2")) == 0
    assert "repaired" in capsys.readouterr().err
    assert len(lines_of(path)) == 2


# ---------------------------------------------------------------- corrupt input files
@pytest.fixture(scope="module")
def criteria_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crit") / "criteria"
    assert cli.main(["collect", "--model", TINY_RANDOM, "--tasks", "copa", "--per-task", "6", "--criteria",
                     "l2norm", "--out", str(out), "--no-progress"]) == 0
    return out


def train(data, tmp_path, *extra):
    return ["train", "--data", str(data), "--kind", "shadowllm", "--criterion", "l2norm", "--epochs", "2",
            "--hidden", "16", "--out", str(tmp_path / "pred"), "--results", str(tmp_path / "t.jsonl"),
            "--no-progress", *extra]


def test_train_does_not_redo_or_repeat_rows_of_an_up_to_date_predictor(criteria_dir, tmp_path, capsys):
    assert cli.main(train(criteria_dir, tmp_path)) == 0
    n = len(lines_of(tmp_path / "t.jsonl"))
    assert cli.main(train(criteria_dir, tmp_path)) == 0
    assert "up to date" in capsys.readouterr().out
    assert len(lines_of(tmp_path / "t.jsonl")) == n
    assert cli.main(train(criteria_dir, tmp_path, "--epochs", "3")) == 0  # a changed setting trains again
    assert len(lines_of(tmp_path / "t.jsonl")) == 2 * n
    assert cli.main(train(criteria_dir, tmp_path, "--epochs", "3", "--force")) == 0
    assert len(lines_of(tmp_path / "t.jsonl")) == 3 * n


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_truncated_criteria_file_is_one_line_naming_it(criteria_dir, tmp_path):
    bad = copy_dir(criteria_dir, tmp_path / "bad")
    data = (bad / "criteria.safetensors").read_bytes()
    (bad / "criteria.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"train: criteria file .*criteria.safetensors.* is not a readable "
                                         r"safetensors file"):
        cli.main(train(bad, tmp_path))


def test_a_corrupt_meta_json_names_the_file(criteria_dir, tmp_path):
    bad = copy_dir(criteria_dir, tmp_path / "bad")
    (bad / "meta.json").write_text('{"model": "tiny-rand')
    with pytest.raises(SystemExit, match=r"meta.json.* is not valid JSON"):
        cli.main(train(bad, tmp_path))


def test_a_truncated_predictor_is_a_failed_case_naming_the_file(criteria_dir, tmp_path):
    assert cli.main(train(criteria_dir, tmp_path)) == 0
    pred = tmp_path / "pred" / "shadowllm-l2norm.safetensors"
    pred.write_bytes(pred.read_bytes()[:100])
    code = cli.main(["quality", "--model", TINY_RANDOM, "--modes", "shadowllm", "--criteria", "l2norm", "--tasks", "",
                     "--ppl-tokens", "64", "--context", "32", "--stride", "32", "--predictors-dir",
                     str(tmp_path / "pred"), "--out", str(tmp_path / "q.jsonl"), "--no-progress"])
    assert code == 1
    err = [r for r in lines_of(tmp_path / "q.jsonl") if r["status"] == "error"]
    assert len(err) == 1 and "not a readable safetensors file" in err[0]["extra"]["error"]
    assert "shadowllm-l2norm.safetensors" in err[0]["extra"]["error"]


def test_a_corrupt_checkpoint_config_and_a_pickled_model_are_one_line(tmp_path):
    from models.loading import load_model

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "opt", "hidden')
    with pytest.raises(ValueError, match=r"checkpoint config .*config.json.* is not valid JSON"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "opt", "hidden_size": 8, "ffn_dim": 16,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                                   "max_position_embeddings": 16, "vocab_size": 10}))
    torch.save(torch.nn.Linear(2, 2), folder / "pytorch_model.bin")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a plain state dict of tensors.*re-save") as err:
        load_model(str(folder))
    assert "weights_only=False" not in str(err.value)


def test_a_corrupt_config_file_is_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[latency\nmodels = 1")
    with pytest.raises(SystemExit, match="is not valid TOML"):
        cli.main(["latency", "--config", str(cfg)])


def test_the_missing_checkpoint_hint_names_a_flag_that_exists(tmp_path):
    from models.loading import _resolve_folder

    with pytest.raises(ValueError) as err:
        _resolve_folder("nobody/no-such-model-xyz", download=False)
    assert "--download" in str(err.value)
    assert "--download" in {o for a in cli.build_parser()._subparsers._group_actions[0].choices["quality"]._actions
                            for o in a.option_strings}


# ---------------------------------------------------------------- bad values: one line, before any work
BAD = [
    (["latency", "--prompt", "0"], "--prompt must be >= 1"),
    (["latency", "--batch", "0"], "--batch must be >= 1"),
    (["latency", "--gen", "0"], "generation lengths must be >= 1"),
    (["latency", "--models", "tiny", "--prompt", "600"], "exceed tiny's 512"),
    (["latency", "--policy", "foo"], "unknown policy"),
    (["latency", "--models", "foo-7b"], "unknown model"),
    (["demo", "--sparsity", "1.5"], "sparsity must be in"),
    (["demo", "--sparsity", "abc"], "expected comma-separated numbers"),
    (["demo", "--data-dir", "/nonexistent"], "is not a folder"),
    (["quality", "--limit", "-1"], "--limit must be >= 1"),
    (["quality", "--shots", "-1"], "--shots must be >= 0"),
    (["quality", "--modes", "bogus"], "unknown mode"),
    (["quality", "--data-dir", "/nonexistent"], "is not a folder"),
    (["quality", "--stride", "600", "--context", "512"], "must not exceed context"),
    (["train", "--data", "x", "--hidden", "0"], "--hidden must be >= 1"),
    (["train", "--data", "x", "--batch", "0"], "--batch must be >= 1"),
    (["train", "--data", "x", "--val-fraction", "1"], "--val-fraction must be in"),
    (["collect", "--per-task", "-1"], "--per-task must be >= 0"),
    (["collect", "--batch", "0"], "--batch must be >= 1"),
    (["collect", "--criteria", "magic"], "unknown criteria"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_each_bad_value_is_one_line_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    import models.loading

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the bad value was found")

    monkeypatch.setattr(models.loading, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    text = str(exit_info.value.code) + capsys.readouterr().err
    assert message in text
    assert "Traceback" not in text
    assert not any(tmp_path.rglob("*.jsonl"))  # no row written


def test_cpu_latency_rows_do_not_claim_the_interpreter(complete_latency):
    if DEVICE.type == "cuda":
        pytest.skip("CPU labels")
    assert {r["device"] for r in lines_of(complete_latency)} == {"cpu"}


# ---------------------------------------------------------------- NaN reaches the output as in the references
def _nan_input(n):
    x = torch.randn(n, device=DEVICE)
    x[3] = float("nan")
    return x


def test_kernels_propagate_nan_like_their_references():
    import shadow_kernels as sk

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=gen).to(DEVICE)
    b = torch.randn(24, generator=gen).to(DEVICE)
    idx = torch.arange(0, 24, 2, device=DEVICE, dtype=torch.int32)
    x = _nan_input(16)
    out = sk.gather_rows_gemv(w, x, idx, b, activation="relu")
    ref = sk.gather_rows_gemv_ref(w, x, idx, b, activation="relu")
    assert torch.isnan(ref).all() and torch.equal(torch.isnan(out), torch.isnan(ref))
    w1, b1 = torch.randn(8, 16, generator=gen).to(DEVICE), torch.randn(8, generator=gen).to(DEVICE)
    w2, b2 = torch.randn(6, 8, generator=gen).to(DEVICE), torch.randn(6, generator=gen).to(DEVICE)
    fp = sk.fused_predictor(x, w1, b1, w2, b2)
    assert torch.equal(torch.isnan(fp), torch.isnan(sk.fused_predictor_ref(x, w1, b1, w2, b2))) and fp.isnan().all()
    sh = sk.sparse_hidden_predictor(x, w1, b1, w2.T.contiguous(), b2)
    assert sh.isnan().all()
    with pytest.raises(ValueError, match="NaN"):
        sk.topk_indices(fp.reshape(2, 3), 1)


def test_make_row_keeps_case_stamps_in_extra(tmp_path):
    path = tmp_path / "r.jsonl"
    RowWriter(path).write([make_row(kind="latency", metric="a", value=1), make_row(kind="latency", metric="b",
                                                                                  value=2)])
    rows = lines_of(path)
    assert {r["extra"]["case_rows"] for r in rows} == {2} and len({r["extra"]["case_id"] for r in rows}) == 1


def test_calibrate_then_quality_in_threshold_mode(tmp_path, capsys):
    th = tmp_path / "th.safetensors"
    assert cli.main(["calibrate", "--model", TINY_RANDOM, "--sparsity", "0.5", "--tokens", "400", "--context", "100",
                     "--out", str(th), "--no-progress"]) == 0
    argv = ["quality", "--model", TINY_RANDOM, "--modes", "dense,threshold", "--sparsity", "0.5", "--tasks", "",
            "--ppl-tokens", "128", "--context", "64", "--stride", "32", "--thresholds", str(th),
            "--out", str(tmp_path / "q.jsonl"), "--no-progress"]
    assert cli.main(argv) == 0
    rows = {r["mode"]: r for r in lines_of(tmp_path / "q.jsonl")}
    assert rows["threshold"]["criterion"] == "magnitude" and rows["threshold"]["extra"]["input_sparsity"] == 0.5
    assert rows["threshold"]["value"] != rows["dense"]["value"]
    assert cli.main([*argv[:6], "0.3", *argv[7:]]) == 1  # no thresholds calibrated for 0.3: a failed case, said
    err = [r for r in lines_of(tmp_path / "q.jsonl") if r["status"] == "error"]
    assert "no thresholds for sparsity 0.3" in err[0]["extra"]["error"]
    with pytest.raises(SystemExit, match="has no latency"):
        cli.main(["latency", "--modes", "oracle"])


def test_the_write_probe_survives_another_rank_removing_its_file(tmp_path, monkeypatch):
    """Two ranks of one sweep both probe a results file that does not exist yet: each creates it and removes it, and
    the second removal finds it gone. That is not a path that cannot be written."""
    path = tmp_path / "rows.jsonl"
    real_open = Path.open

    def open_then_other_rank_removes(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        if self == path:
            path.unlink()  # the other rank's probe removal, between this one's create and its removal
        return handle

    monkeypatch.setattr(Path, "open", open_then_other_rank_removes)
    RowWriter(path)
    assert not path.exists()
