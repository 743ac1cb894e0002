import json

import pytest
import torch
import triton

from shadow_kernels import tuned

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
    from shadow_kernels import gather_cols, gather_rows

    kernels = {"rows_single": (gather_rows._rows_gemv_single, gather_rows._SINGLE_V7 + gather_rows._SINGLE_V6),
               "cols_single": (gather_cols._cols_single, gather_cols._SINGLE_V7 + gather_cols._SINGLE_V6)}
    tuned.reload()
    for entries in tuned._load().values():
        for e in entries:
            tuner, configs = kernels[e["kernel"]]
            assert set(e["key"]) <= set(tuner.keys), e
            assert sum(tuned._same(c, e["config"]) for c in configs) == 1, e
