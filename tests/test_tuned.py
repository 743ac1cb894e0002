import json

import pytest
import torch
import triton

from shadow_kernels import tuned

from conftest import DEVICE

CONFIGS = [triton.Config({"BLOCK_N": 2, "BLOCK_K": 1024, "PREFETCH": 1}, num_warps=4, num_stages=1),
           triton.Config({"BLOCK_N": 2, "BLOCK_K": 1024}, num_warps=4, num_stages=2),
           triton.Config({"BLOCK_N": 16, "BLOCK_K": 256, "PREFETCH": 1}, num_warps=4, num_stages=1)]


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"device": "dev", "source": "test", "entries": [
        {"kernel": "rows_single", "dtype": "torch.float16", "key": {"K": 2048, "NORM": 0},
         "config": {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2}, "role": "out_proj"},
        {"kernel": "rows_single", "dtype": "torch.float16", "key": {"K": 2048, "NORM": 1},
         "config": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}, "role": "not a config"},
    ]}))
    monkeypatch.setattr(tuned, "_DIR", tmp_path / "none")  # only the file named by the variable
    monkeypatch.setenv("SHADOWBENCH_TUNED", str(path))
    monkeypatch.setattr(tuned, "_device_name", lambda args: "dev")
    tuned.reload()
    prev = tuned.set_pinned(True)
    yield path
    tuned.set_pinned(prev)
    tuned.reload()


def test_pinned_config_is_the_only_one_left(table):
    prune = tuned.pinned_prune("rows_single", "w_ptr")
    w = torch.zeros(2, dtype=torch.float16)
    # the entry's config (no PREFETCH key: PREFETCH 0) among the kernel's: that one alone
    assert prune(CONFIGS, {"w_ptr": w, "K": 2048}, NORM=0) == [CONFIGS[1]]
    assert tuned.used() == [{"kernel": "rows_single", "role": "out_proj", "config": {
        "BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2}}]
    # another key value, another dtype, a config the kernel does not have, another kernel: all configs
    assert prune(CONFIGS, {"w_ptr": w, "K": 4096}, NORM=0) == CONFIGS
    assert prune(CONFIGS, {"w_ptr": w.bfloat16(), "K": 2048}, NORM=0) == CONFIGS
    assert prune(CONFIGS, {"w_ptr": w, "K": 2048}, NORM=1) == CONFIGS
    assert tuned.pinned_prune("cols", "w_ptr")(CONFIGS, {"w_ptr": w, "K": 2048}, NORM=0) == CONFIGS
    tuned.set_pinned(False)
    assert prune(CONFIGS, {"w_ptr": w, "K": 2048}, NORM=0) == CONFIGS


def test_bad_table_is_named(table):
    table.write_text(json.dumps({"entries": []}))
    tuned.reload()
    with pytest.raises(ValueError, match="needs 'device' and a list of 'entries'"):
        tuned.pinned_prune("rows_single", "w_ptr")(CONFIGS, {"K": 1})


def test_shipped_tables_parse():
    tuned.reload()
    for device, entries in tuned._load().items():
        assert isinstance(device, str)
        for e in entries:
            assert {"kernel", "key", "config"} <= set(e)


def test_shipped_entries_name_a_config_and_keys_of_their_kernel():
    """An entry whose config is not among its kernel's configs, or whose key names an argument the autotuner does
    not key on, would never apply (or apply too widely) without a word: every shipped entry is checked here against
    the full config lists (the interpreter's autotuners hold only the first)."""
    from shadow_kernels import gather_cols, gather_rows, gather_segments

    kernels = {"rows_single": (gather_rows._rows_gemv_single, gather_rows._SINGLE_PREFETCH + gather_rows._SINGLE_PLAIN),
               "cols_single": (gather_cols._cols_single, gather_cols._SINGLE_PREFETCH + gather_cols._SINGLE_PLAIN),
               "segments_single": (gather_segments._segments_single, gather_segments._SINGLE_ALL)}
    tuned.reload()
    for entries in tuned._load().values():
        for e in entries:
            tuner, configs = kernels[e["kernel"]]
            assert set(e["key"]) <= set(tuner.keys), e
            assert sum(tuned._same(c, e["config"]) for c in configs) == 1, e


def _alone_rows(case, key, us, tuned_us, device="dev"):
    """Rows of ``shadowbench tune --method alone`` for one case: the autotuner's pick and each config alone."""
    model, op, s = case
    head = {"model": model, "op": op, "sparsity": s, "device": device, "key": key}
    rows = [{**head, "variant": "tuned", "us": tuned_us, "kernel": "cols_single", "dtype": "torch.float16",
             "config": {"BLOCK_M": 128}}]
    return rows + [{**head, "variant": f"alone_{i}", "us": t, "config": {"BLOCK_M": 64 << i}} for i, t in enumerate(us)]


def test_table_from_alone_rows_picks_the_best_mean_over_cases_sharing_a_key():
    from bench.tune import build_table as build

    k1 = {"M": 2048, "SEL_BUCKET": 4096}
    k2 = {"M": 2048, "SEL_BUCKET": 8192}
    # two cases share k1: config 0 is best in one by 10%, config 1 best in the other by 30%: config 1 wins
    rows = (_alone_rows(("m", "fc2", 0.5), k1, [10.0, 11.0], 12.0)
            + _alone_rows(("m", "fc2", 0.7), k1, [13.0, 10.0], 10.5)
            + _alone_rows(("m", "fc2", 0.0), k2, [20.0, 25.0], 25.0) + [{"kind": "probe", "device": "dev"}])
    table = build(rows, "test")
    assert table["device"] == "dev" and table["source"] == "test"
    by = {(json.dumps(e["key"], sort_keys=True)): e for e in table["entries"]}
    assert len(by) == 4  # every key without and with a device-side count
    e = by[json.dumps({**k1, "HAS_COUNT": False}, sort_keys=True)]
    assert e["config"] == {"BLOCK_M": 128} and e["steady_us"] == [11.0, 10.0]
    assert e["autotuned_steady_us"] == [12.0, 10.5]
    assert e["role"] == "m fc2 s=0.5, m fc2 s=0.7" and e["kernel"] == "cols_single"
    assert by[json.dumps({**k2, "HAS_COUNT": True}, sort_keys=True)]["config"] == {"BLOCK_M": 64}
    with pytest.raises(ValueError, match="one device"):
        build(rows + _alone_rows(("m", "fc2", 0.9), k2, [1.0], 1.0, device="other"), "test")
    with pytest.raises(ValueError, match="no 'tuned' row"):
        build([r for r in rows if r.get("variant") != "tuned"], "test")


def test_merge_table_replaces_entries_of_the_same_key_and_refuses_another_device(tmp_path):
    from bench.tune import merge_table

    path = tmp_path / "t.json"
    e = lambda key, cfg: {"kernel": "cols_single", "dtype": "torch.float16", "key": key, "config": cfg}
    merge_table(path, {"device": "dev", "source": "a", "entries": [e({"M": 1}, {"BLOCK_M": 64}),
                                                                    e({"M": 2}, {"BLOCK_M": 64})]})
    merged = merge_table(path, {"device": "dev", "source": "b", "entries": [e({"M": 2}, {"BLOCK_M": 128})]})
    assert merged["source"] == "b"
    assert {e["key"]["M"]: e["config"]["BLOCK_M"] for e in json.loads(path.read_text())["entries"]} == {1: 64, 2: 128}
    with pytest.raises(ValueError, match="is a table for 'dev'"):
        merge_table(path, {"device": "other", "source": "c", "entries": []})


def test_restricted_tunes_over_the_given_configs_and_restores_the_autotuner():
    tuner = tuned.autotuners()["cols_single"]
    before = list(tuner.configs)
    with tuned.restricted("cols_single", before[:1]) as t:
        assert t is tuner and t.configs == before[:1] and not t.cache
    assert tuner.configs == before
    with pytest.raises(ValueError, match="at least one config"), tuned.restricted("cols_single", []):
        pass
    with pytest.raises(ValueError, match="unknown kernel"):
        tuned.key_names("nope_single")


def test_tune_alone_times_every_config_of_a_case_against_its_reference():
    """One case of ``--method alone`` on a tiny shape: the autotuner's pick and each config alone, every output
    checked against the fp32 reference (the interpreter holds one config per kernel, so that is two rows)."""
    from bench.tune import alone_case

    rows = []
    alone_case("tiny", "out_proj", 0.5, DEVICE, 1.0, rows.append)
    assert [r["variant"] for r in rows] == ["tuned"] + [f"alone_{i}" for i in
                                                        range(len(tuned.autotuners()["segments_single"].configs))]
    assert all(r["rel_err"] < 1e-2 and r["us"] > 0 and r["kernel"] == "segments_single" for r in rows)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the refusal is for machines without a GPU")
def test_tune_refuses_to_choose_among_one_config_before_any_work(tmp_path, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit, match="tune chooses among a kernel's configs.*run it on the GPU"):
        main(["tune", "--models", "tiny", "--rows", str(tmp_path / "r.jsonl"), "--table", str(tmp_path / "t.json")])
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "t.json").exists()
