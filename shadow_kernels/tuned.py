"""Pinned kernel configs: choices made by timing whole decode steps, per device, that the autotuner then uses
instead of timing each call alone.

The autotuner times a config by itself on cold data. In a decode step the kernels run as one chain with
programmatic dependent launch, and a kernel starts streaming early only when the one before it leaves room on the
SMs; so the config that is fastest alone is not always the one that makes the step fastest, and configs within
the autotuner's noise of each other are picked differently from process to process (OPT-1.3B dense per token
1.178 and 1.203 ms in two processes of the same code; notes/models.md). ``shadowbench tune`` writes tables:
``--method step`` tries every config of a dense GEMV in a freshly captured decode step, role by role;
``--method alone`` times every gather-cols (fc2) and gather-segments (out_proj) config alone per sweep shape.

A table is a JSON file in ``shadow_kernels/tuned/`` (or the file named by ``SHADOWBENCH_TUNED``)::

    {"device": "NVIDIA H100 80GB HBM3", "source": "...",
     "entries": [{"kernel": "rows_single", "dtype": "torch.float16",
                  "key": {"K": 2048, "ROWS_BUCKET": 2048, "NORM": 0, ...},
                  "config": {"BLOCK_N": 2, "BLOCK_K": 1024, "PREFETCH": 1, "num_warps": 4, "num_stages": 1},
                  "role": "opt-1.3b out_proj", ...}]}

An entry applies on a device of that name when every key value equals the launch's and its config is one of the
kernel's configs; otherwise the autotuner times the configs as usual. ``set_pinned(False)`` or
``SHADOWBENCH_PINNED=0`` turns the tables off (for later first launches of a shape).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ._common import set_switch

_STATE = {"on": os.environ.get("SHADOWBENCH_PINNED", "1") != "0"}
_DIR = Path(__file__).parent / "tuned"
_TABLES: dict | None = None  # device name -> list of entries
_NAMES: dict = {}  # device index -> name
USED: dict = {}  # (kernel, key items) -> entry: what was pinned in this process (for the results rows)


def set_pinned(on: bool) -> bool:
    """Use the pinned configs for launches whose shape has not been tuned yet in this process, or not; returns the
    previous setting."""
    return set_switch(_STATE, on, "set_pinned")


def _load() -> dict:
    global _TABLES
    if _TABLES is None:
        files = sorted(_DIR.glob("*.json"))
        extra = os.environ.get("SHADOWBENCH_TUNED")
        if extra:
            files.append(Path(extra))
        tables: dict = {}
        for f in files:
            with open(f) as fh:
                t = json.load(fh)
            if not isinstance(t, dict) or "device" not in t or not isinstance(t.get("entries"), list):
                raise ValueError(f"{f}: a pinned-config table needs 'device' and a list of 'entries'")
            tables.setdefault(t["device"], []).extend(t["entries"])
        _TABLES = tables
    return _TABLES


def reload() -> None:
    """Read the tables again (after writing one)."""
    global _TABLES
    _TABLES = None
    USED.clear()


def _device_name(args: dict) -> str | None:
    for v in args.values():
        if isinstance(v, torch.Tensor) and v.device.type == "cuda":
            i = v.device.index if v.device.index is not None else torch.cuda.current_device()
            if i not in _NAMES:
                _NAMES[i] = torch.cuda.get_device_name(i)
            return _NAMES[i]
    return None


def _same(config, want: dict) -> bool:
    """``config`` is the one ``want`` names: the same meta-parameters (an absent one is 0) and, where given, warps
    and stages."""
    kw = config.kwargs
    names = (set(kw) | set(want)) - {"num_warps", "num_stages"}
    return (all(kw.get(k, 0) == want.get(k, 0) for k in names)
            and config.num_warps == want.get("num_warps", config.num_warps)
            and config.num_stages == want.get("num_stages", config.num_stages))


def pinned_prune(kernel: str, weight_arg: str):
    """An ``early_config_prune`` for a Triton autotuner: the pinned config of this launch when a table has one, all
    configs otherwise. ``weight_arg`` names the argument whose dtype an entry's ``dtype`` is matched against."""

    def prune(configs, named_args, **kwargs):
        if not _STATE["on"]:
            return configs
        args = {**named_args, **kwargs}
        name = _device_name(named_args)
        entries = _load().get(name, []) if name else []
        w = args.get(weight_arg)
        for e in entries:
            if e.get("kernel") != kernel or (w is not None and e.get("dtype", str(w.dtype)) != str(w.dtype)):
                continue
            if all(args.get(k) == v for k, v in e["key"].items()):
                hit = [c for c in configs if _same(c, e["config"])]
                if hit:
                    USED[(kernel, tuple(sorted(e["key"].items())))] = e
                    return hit[:1]
        return configs

    return prune


def used() -> list[dict]:
    """The pinned entries this process has launched with: role and config (for ``extra`` of a results row)."""
    return [{"kernel": k, "role": e.get("role"), "config": e["config"]} for (k, _), e in USED.items()]


def autotuners() -> dict:
    """The autotuned kernels by the name pinned tables use for them (``rows_single``, ``cols_single``, ...). Each has
    ``configs``, ``cache`` (autotune key -> config) and ``best_config``, as a Triton autotuner."""
    from . import gather_cols, gather_rows, gather_segments

    return {"rows_single": gather_rows._rows_gemv_single, "rows_batched": gather_rows._rows_gemv_batched,
            "cols_single": gather_cols._cols_single, "cols_batched": gather_cols._cols_batched,
            "segments_single": gather_segments._segments_single,
            "segments_batched": gather_segments._segments_batched}


def key_names(kernel: str) -> list[str]:
    """The autotune key of a kernel, by name, in the order of its cache's keys."""
    from . import gather_cols, gather_rows, gather_segments

    keys = {"rows": gather_rows._KEY, "cols": gather_cols._KEY, "segments": gather_segments._KEY}
    family = kernel.split("_")[0]
    if family not in keys or kernel not in autotuners():
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(autotuners())}")
    return list(keys[family])


def config_dict(config) -> dict:
    """A config as a pinned table's entry stores it."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


@contextlib.contextmanager
def restricted(kernel: str, configs):
    """Within the block, the autotuner of ``kernel`` chooses among ``configs`` only, and its cache starts empty (every
    shape is tuned again, pinned tables aside); afterwards its configs and cache are as before."""
    tuner = autotuners()[kernel]
    configs = list(configs)
    if not configs:
        raise ValueError(f"restricted({kernel!r}) needs at least one config")
    saved_configs, saved_cache = tuner.configs, dict(tuner.cache)
    tuner.configs = configs
    tuner.cache.clear()
    try:
        yield tuner
    finally:
        tuner.configs = saved_configs
        tuner.cache.clear()
        tuner.cache.update(saved_cache)
