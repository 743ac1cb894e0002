import json

import pytest
import torch

from bench import cli, kernels
from bench.results import SCHEMA, RowWriter, make_row
from models.registry import get_spec


def run(tmp_path, ops, **kw):
    return kernels.run_sweep([kernels.TINY], ops, [0.5], [1], "fp16", tmp_path / "k.jsonl", progress=False,
                             **kw)


def test_sweep_writes_checked_rows_and_resumes(tmp_path):
    rows = run(tmp_path, ["fc1", "topk_global"])
    assert rows and all(set(SCHEMA) <= set(r) for r in rows)
    assert {r["status"] for r in rows} == {"ok"}
    errs = {r["extra"]["variant"]: r["value"] for r in rows if r["metric"] in ("rel_err", "mismatched_units")}
    assert errs["triton"] <= kernels.TOLERANCE[kernels.DTYPES["fp16"]]
    on_disk = [json.loads(line) for line in (tmp_path / "k.jsonl").read_text().splitlines()]
    assert len(on_disk) == len(rows)
    assert run(tmp_path, ["fc1", "topk_global"]) == []  # resumed: nothing left to do


def test_a_failing_case_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = kernels.build_case

    def broken(spec, case, *args):
        if case.op == "fc2":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(spec, case, *args)

    monkeypatch.setattr(kernels, "build_case", broken)
    rows = run(tmp_path, ["fc2", "qkv"])
    failed = [r for r in rows if r["status"] == "error"]
    assert len(failed) == 1 and "out of memory" in failed[0]["extra"]["error"]
    assert any(r["extra"]["op"] == "qkv" and r["status"] == "ok" for r in rows)


def test_wrong_results_are_flagged(tmp_path, monkeypatch):
    real = kernels.build_case

    def skewed(spec, case, *args):
        built = real(spec, case, *args)
        good = built.variants["triton"]
        built.variants["triton"] = lambda: good() * 1.1
        return built

    monkeypatch.setattr(kernels, "build_case", skewed)
    rows = run(tmp_path, ["fc1"])
    assert {r["status"] for r in rows if r["extra"]["variant"] == "triton"} == {"wrong"}
    assert "WRONG: triton" in kernels.summary_table(rows)


def test_kept_rounds_and_keeps_at_least_one():
    assert kernels.kept(100, 0.0) == 100
    assert kernels.kept(100, 0.7) == 30
    assert kernels.kept(3, 0.99) == 1


def test_torn_last_line_is_redone_but_damage_elsewhere_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    writer = RowWriter(path)
    writer.write([make_row(kind="kernel", metric="time_us", value=1.0)])
    with path.open("a") as fh:
        fh.write('{"kind": "kern')  # killed mid-write
    assert len(writer.existing()) == 1
    path.write_text('{"broken\n' + json.dumps(make_row(metric="x")) + "\n")
    with pytest.raises(ValueError, match="rows.jsonl:1: not valid JSON"):
        writer.existing()


def test_make_row_moves_unknown_keys_into_extra():
    row = make_row(model="opt-13b", metric="time_us", value=2.0, op="fc1")
    assert row["model"] == "opt-13b" and row["extra"] == {"op": "fc1"} and row["status"] == "ok"


@pytest.mark.parametrize("argv,message", [
    (["kernels", "--sparsity", "0.5,1.0"], "sparsity must be in [0, 1)"),
    (["kernels", "--batch", "0"], "batch sizes must be >= 1"),
    (["kernels", "--sparsity", "half"], "expected comma-separated numbers"),
])
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["kernels", "--models", "opt-7b"], "unknown model(s) ['opt-7b']"),
    (["kernels", "--models", "tiny", "--ops", "fc3"], "unknown op(s) ['fc3']"),
])
def test_cli_rejects_unknown_names(argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        cli.main(argv)


def test_cli_runs_on_this_machine(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert cli.main(["kernels", "--ops", "qkv", "--sparsity", "0.5", "--batch", "1", "--no-progress",
                     "--out", str(out)]) == 0
    assert "qkv" in capsys.readouterr().out and out.exists()


def test_commit_override(monkeypatch):
    from bench.results import git_commit

    monkeypatch.setenv("SHADOWBENCH_COMMIT", "abc123")
    assert git_commit() == "abc123"
    monkeypatch.delenv("SHADOWBENCH_COMMIT")
    assert git_commit() != "abc123"


def test_swiglu_op_runs_on_llama_and_is_skipped_on_opt(tmp_path):
    rows = kernels.run_sweep(["tiny-llama", "tiny"], ["swiglu"], [0.5], [1], "fp16", tmp_path / "k.jsonl",
                             progress=False)
    llama = [r for r in rows if r["model"] == "tiny-llama"]
    errs = {r["extra"]["variant"]: r["value"] for r in llama if r["metric"] == "rel_err"}
    assert {r["status"] for r in llama} == {"ok"} and errs["triton"] <= kernels.TOLERANCE[kernels.DTYPES["fp16"]]
    opt = [r for r in rows if r["model"] == "tiny"]
    assert opt and {r["status"] for r in opt} == {"skipped"}


def test_steady_timer_cancels_what_a_replay_pays_once(monkeypatch):
    """time_steady: (graph of the calls twice over - graph of them once) / n. Here a replay costs 17 us once plus
    3 us a call (the shape the v12 probe's rows fit); the stream timer reports 3 + 17/4, the steady one 3."""
    from bench import timing

    calls = []

    def fake_time_op(fn, device):
        calls.clear()
        fn()
        us = 17.0 + 3.0 * len(calls)
        return {"median_us": us, "p20_us": us - 1, "p80_us": us + 1, "reps": 50, "timer": "fake"}

    monkeypatch.setattr(timing, "time_op", fake_time_op)
    fns = [lambda: calls.append(1)] * 4
    cuda = torch.device("cuda")
    assert timing.time_stream(fns, cuda)["median_us"] == pytest.approx(3.0 + 17.0 / 4)
    t = timing.time_steady(fns, cuda)
    assert t["median_us"] == pytest.approx(3.0)
    assert t["calls_per_replay"] == 4 and t["replay_twice_us"] - t["replay_once_us"] == pytest.approx(12.0)
    assert "steady" in t["timer"]


@pytest.mark.parametrize("timer", ["eager", "cold", "host"])
def test_user_side_timers_write_rows_that_say_their_timer(tmp_path, timer):
    """The eager (as a Python caller sees an op), cold-graph and host-cost timers run every variant once per call on
    one copy of the data, and each row names its timer (on the CPU, wall clock: not GPU speed)."""
    rows = kernels.run_sweep([kernels.TINY], ["fc1"], [0.5], [1], "fp16", tmp_path / "k.jsonl", progress=False,
                             timer=timer)
    times = [r for r in rows if r["metric"] == "time_us"]
    assert times and all(r["value"] > 0 and r["extra"]["timer_kind"] == timer for r in times)
    assert all(r["extra"]["timer"].startswith(timer.replace("cold", "cold graph")) for r in times)
    assert kernels.run_sweep([kernels.TINY], ["fc1"], [0.5], [1], "fp16", tmp_path / "k.jsonl", progress=False,
                             timer=timer) == []


def test_host_cost_counts_the_enqueue_of_each_call():
    import time as _time

    from bench.timing import host_cost

    t = host_cost(lambda: _time.sleep(0.001), torch.device("cpu"), n=10)
    assert 900 <= t["median_us"] <= 5000 and "enqueue 3 calls" in t["timer"]  # a CPU takes few calls


def test_threshold_op_is_checked_against_the_masked_product(tmp_path):
    """The threshold mode's down projection: the fused one-token path (batch 1), the select-then-gather path and the
    composed path all equal the fp32 product of the kept inputs; about a fraction s of the inputs is dropped."""
    rows = kernels.run_sweep(["tiny-llama"], ["threshold_fc2"], [0.5], [1, 3], "fp16", tmp_path / "k.jsonl",
                             progress=False)
    assert rows and {r["status"] for r in rows} == {"ok"}
    errs = {(r["batch"], r["extra"]["variant"]): r["value"] for r in rows if r["metric"] == "rel_err"}
    assert {v for _, v in errs} == {"triton", "triton_select_gather", "triton_composed"}
    assert all(e <= kernels.TOLERANCE[kernels.DTYPES["fp16"]] for e in errs.values()), errs
    ffn = get_spec("tiny-llama").ffn
    kept = {r["extra"]["selected"] for r in rows if r["batch"] == 1}
    assert kept == {ffn // 2} or kept == {ffn // 2 - 1} or kept == {ffn // 2 + 1}, kept
