"""``python -m bench.profile`` (``tox -e profile``): the NVTX ranges reach a trace a user can open."""

import json

from bench import profile


def test_without_nsys_a_chrome_trace_carries_every_range(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profile.shutil, "which", lambda name: None)
    out = tmp_path / "prof" / "run"
    assert profile.main(["--model", "tiny-llama", "--mode", "shadowllm", "--steps", "3", "--nsys", str(out)]) == 0
    trace = json.loads((tmp_path / "prof" / "run.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    want = {"shadowbench:prefill", "shadowbench:decode", "shadowbench:predictor"}
    want |= {f"shadowbench:layer{i}.{part}" for i in range(3) for part in ("attn", "mlp")}
    assert want <= names
    assert "Chrome / Perfetto trace" in capsys.readouterr().err


def test_without_a_profiler_the_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert profile.main(["--model", "tiny", "--mode", "dense", "--steps", "2"]) == 0
    assert not list(tmp_path.iterdir())
