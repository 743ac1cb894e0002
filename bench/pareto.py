"""``shadowbench pareto``: the quality and the decode latency of the same configurations, joined by one key.

For a real model (a checkpoint, SmolLM2 by default) and every configuration (mode x sparsity x policy x criterion,
with the trained predictors, importance files or thresholds that exist for it), the sweep

1. scores it: WikiText-2 perplexity and task accuracy through :func:`bench.quality.run_quality` (rows of kind
   ``quality``, appended to the quality table);
2. times it: per-token decode latency of that configuration, with the same predictor files at their real widths and
   dtypes (rows of kind ``latency`` with ``weights: trained``, appended to the latency table), timing the very mode
   object that was scored. The oracle has no decode step, so no latency: its rows say so (status ``skipped``);
3. stamps both with ``extra.config_key`` (model, mode, criterion, policy, head and neuron sparsity, granularity,
   key/value rule, predictor dtype, and the sha256 of the file the mode reads), which :func:`join` and the report
   use to put each configuration's quality beside its speed.

Both parts resume: a configuration whose rows are there with the same settings is not run again. On a CPU the
latency is the PyTorch reference path's, not GPU speed (rows say the device).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import PurePath

import torch

from .quality import QualityCase, mode_of, quality_cases, run_quality
from .results import RowWriter, environment, file_digest, git_commit, make_row, settings_key


def config_key(model: str, case: QualityCase, mode, *, granularity: str, predictor_dtype: str, source) -> str:
    b = mode.budgets()
    rule = {"neuron_rule": b["neuron_rule"]} if b.get("neuron_rule") else {}  # (absent: top-k; keys stay as they were)
    return settings_key({**rule, "model": model, "mode": case.mode, "criterion": case.criterion, "policy": case.policy,
                         "sparsity": case.sparsity, "head_sparsity": b.get("head_sparsity"),
                         "neuron_sparsity": b.get("neuron_sparsity"),
                         # a dense step computes every key and value whatever the rule asked: one configuration
                         "kv_rule": "skip" if case.mode == "dense" else b.get("kv_rule"),
                         "granularity": granularity if case.mode in ("dejavu", "shadowllm") else None,
                         "predictor_dtype": predictor_dtype if case.mode in ("dejavu", "shadowllm") else None,
                         "source_sha256": file_digest(source)})


def run_pareto(model, tokenizer, *, model_name, modes, criteria, sparsities, policies=("local",), granularity="token",
               tasks=(), limit=None, ppl=True, ppl_tokens=2048, context=512, stride=256, criteria_dir=None,
               predictors_dir=None, thresholds=None, data_dir=None, predictor_dtype="model", head_sparsity=None,
               neuron_sparsity=None, kv_rule="skip", prompt_len=128, gen_len=128, quality_out="runs/quality.jsonl",
               latency_out="runs/latency.jsonl", progress=True, dense_gemv="auto", neuron_rule="topk",
               calib_tokens=4096) -> dict:
    """Quality and latency rows of every configuration, each stamped with its ``config_key``. ``granularity`` (when
    the predictor modes predict: every token, or once per prompt) and ``kv_rule`` apply to both parts alike.
    ``dense_gemv``: what the timed decode steps run dense layers with (``cublas``, ``triton``, or ``auto``: the
    faster that fits, :func:`bench.latency.auto_dense_gemv`); latency rows record it, and a configuration timed
    with another engine is timed again. ``neuron_rule`` ``threshold``: the predictor modes and the oracle keep each
    layer's neurons above a threshold calibrated on ``calib_tokens`` of WikiText-2 validation
    (:func:`bench.quality.run_quality`), and the decode step times the mode with those very thresholds."""
    from .latency import DENSE_GEMVS, LatencyCase, auto_dense_gemv, run_mode_case
    from .timing import copy_bandwidth

    if dense_gemv not in DENSE_GEMVS:
        raise ValueError(f"dense_gemv must be one of {DENSE_GEMVS}, got {dense_gemv!r}")
    lat_writer = RowWriter(latency_out)
    files = dict(criteria_dir=criteria_dir, predictors_dir=predictors_dir, granularity=granularity,
                 predictor_dtype=predictor_dtype, head_sparsity=head_sparsity, neuron_sparsity=neuron_sparsity,
                 thresholds=thresholds, kv_rule=kv_rule, neuron_rule=neuron_rule)
    built = {}  # the modes the quality part bound: timed as they are (their files are loaded and hashed once)
    qrun = run_quality(model, tokenizer, model_name=model_name, modes=modes, criteria=criteria, sparsities=sparsities,
                       policies=policies, tasks=tasks, limit=limit, ppl=ppl, ppl_tokens=ppl_tokens, context=context,
                       stride=stride, data_dir=data_dir, out_path=quality_out, progress=progress,
                       config_key=lambda case, mode, source: config_key(model_name, case, mode, granularity=granularity,
                                                                       predictor_dtype=predictor_dtype, source=source),
                       on_mode=lambda case, mode, source: built.__setitem__(case, (mode, source)),
                       calib_tokens=calib_tokens, **files)
    device = model.device
    env = environment(device)
    engine = dense_gemv
    if engine == "auto":
        cfg = model.full_cfg
        copy = cfg.hidden * cfg.ffn * cfg.n_layers * model.dtype.itemsize  # OPT's natural-layout fc2
        engine = auto_dense_gemv(cfg.family, sum(p.nbytes for p in model.parameters()), copy, device)
    if hasattr(model, "set_dense_gemv"):
        model.set_dense_gemv(engine)
    else:
        engine = "cublas"
    done = {((r.get("extra") or {}).get("config_key"), (r.get("extra") or {}).get("dense_gemv", "cublas"))
            for r in lat_writer.resume() if r.get("kind") == "latency" and r.get("status") in ("ok", "skipped")}
    bw = copy_bandwidth(device)["copy_gbps"]
    base = dict(kind="latency", device=env["device"], dtype=str(model.dtype).replace("torch.", ""), batch=1,
                prompt_len=prompt_len, git_commit=git_commit(), weights="trained",
                extra={"torch": env["torch"], "triton": env["triton"], "copy_gbps": bw, "batch_rule": "mean",
                       "predictor_dtype": predictor_dtype, "dense_gemv": engine, "norm_fold": True})
    new = []
    for case in quality_cases(modes, criteria, sparsities, policies):
        try:
            mode, source = built[case] if case in built else mode_of(case, **files)
            key = config_key(model_name, case, mode, granularity=granularity, predictor_dtype=predictor_dtype,
                             source=source)
        except Exception as err:  # noqa: BLE001 - its quality row says why; nothing to time
            new.append(make_row(**base, model=model_name, mode=case.mode, criterion=case.criterion,
                                policy=case.policy, sparsity=case.sparsity, gen_len=gen_len, metric="error",
                                value=None, unit=None, status="error", error=f"{type(err).__name__}: {err}"))
            lat_writer.write(new[-1:])
            continue
        if (key, engine) in done:
            continue
        common = dict(base, model=model_name, mode=case.mode, criterion=case.criterion, policy=case.policy,
                      sparsity=case.sparsity, gen_len=gen_len, config_key=key, source=source)
        if mode.no_decode:
            rows = [make_row(**common, metric="token_ms", value=None, unit="ms", status="skipped",
                             why=f"no decode step: {mode.no_decode}")]
        else:
            lcase = LatencyCase(model_name, case.mode, case.sparsity, case.policy,
                                granularity if case.mode in ("dejavu", "shadowllm") else None, gen_len,
                                head_sparsity, neuron_sparsity)
            try:
                rows = run_mode_case(model, lcase, prompt_len=prompt_len, batch=1, copy_gbps=bw,
                                     base=dict(common, criterion=case.criterion), mode=mode)
            except Exception as err:  # noqa: BLE001 - recorded; the sweep goes on
                rows = [make_row(**common, metric="error", value=None, unit=None, status="error",
                                 error=f"{type(err).__name__}: {err}")]
            for r in rows:
                r["extra"]["config_key"] = key
                r["criterion"] = case.criterion
            if device.type == "cuda":
                torch.cuda.empty_cache()
        lat_writer.write(rows)
        new += rows
    return {"quality": qrun.rows, "latency": new}


def join(rows) -> list[dict]:
    """One record per configuration key and dense engine: its perplexity, mean task accuracy, ms per token and
    speedup over the dense configuration of the same model, device and dense engine (``extra.dense_gemv`` of the
    latency rows: what the timed steps ran dense layers with; rows without it ran cuBLAS). A configuration timed
    under two engines gives two records with the same quality; one never timed, a record without latency."""
    meta, quality, timed = {}, defaultdict(dict), defaultdict(dict)
    for r in rows:
        e = r.get("extra") or {}
        key = e.get("config_key")
        if not key or r.get("status") != "ok":
            continue
        meta.setdefault(key, {}).update(
            model=r["model"], mode=r["mode"], criterion=r["criterion"], policy=r["policy"], sparsity=r["sparsity"],
            kv_rule=e.get("kv_rule"), head_sparsity=e.get("head_sparsity"), neuron_sparsity=e.get("neuron_sparsity"),
            granularity=e.get("granularity") if r["mode"] in ("dejavu", "shadowllm") else None)
        # the predictor, importance or threshold file's folder, and a staged ShadowLLM's stages (quality rows say
        # them; a latency row without them leaves them be)
        if e.get("source"):
            meta[key]["source_folder"] = PurePath(e["source"]).parent.name
        if e.get("shadowllm_stages"):
            meta[key]["shadowllm_stages"] = e["shadowllm_stages"]
        if e.get("neuron_rule"):
            meta[key]["neuron_rule"] = e["neuron_rule"]
        if r["kind"] == "quality" and r["metric"] == "perplexity":
            quality[key]["perplexity"] = r["value"]
        elif r["kind"] == "quality" and r["metric"] == "acc":
            quality[key].setdefault("acc", {})[e.get("eval")] = r["value"]
        elif r["kind"] == "latency" and r["metric"] == "token_ms":
            engine = e.get("dense_gemv") or "cublas"
            timed[(key, engine)] = {"token_ms": r["value"], "device": r["device"], "dense_gemv": engine}
    engines = defaultdict(list)
    for key, engine in timed:
        engines[key].append(engine)
    out = []
    for key, m in meta.items():
        q = quality.get(key, {})
        for engine in engines.get(key) or [None]:
            rec = dict(m, **{k: dict(v) if isinstance(v, dict) else v for k, v in q.items()})
            rec.update(timed.get((key, engine), {}))
            out.append(rec)
    dense = {(o["model"], o.get("device"), o.get("dense_gemv")): o.get("token_ms") for o in out if o["mode"] == "dense"}
    for o in out:
        if "acc" in o:
            o["acc_mean"] = statistics.fmean(o["acc"].values())
        d = dense.get((o["model"], o.get("device"), o.get("dense_gemv")))
        if d and o.get("token_ms"):
            o["speedup"] = d / o["token_ms"]
    return out


def pareto_table(records) -> str:
    """One line per record of :func:`join`; the mode's column also names a staged ShadowLLM's stages, the neuron rule
    when it is not top-k, and the predictor folder where one mode has several, so that no two lines look alike."""
    folders = defaultdict(set)
    for o in records:
        if o.get("source_folder"):
            folders[(o["model"], o["mode"])].add(o["source_folder"])

    def label(o):
        out = o["mode"] + (f" stages:{o['shadowllm_stages']}" if o.get("shadowllm_stages") else "")
        out += " neurons:threshold" if o.get("neuron_rule") == "threshold" else ""
        return out + (f" [{o['source_folder']}]" if len(folders[(o["model"], o["mode"])]) > 1 else "")

    w = max([10] + [len(label(o)) for o in records])
    lines = [f"{'mode':<{w}} {'crit':<9} {'policy':<7} {'s':>5} {'kv':<6} {'gran.':<6} {'ppl':>9} {'acc':>6} "
             f"{'ms/tok':>8} {'speedup':>8}"]
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
    for o in sorted(records, key=lambda o: (o["mode"] != "dense", label(o), str(o["criterion"]), str(o["policy"]),
                                            o["sparsity"], str(o.get("kv_rule")), str(o.get("granularity")))):
        lines.append(f"{label(o):<{w}} {str(o['criterion'] or '-'):<9} {str(o['policy'] or '-'):<7} "
                     f"{o['sparsity']:>5.2f} {str(o.get('kv_rule') or '-'):<6} {str(o.get('granularity') or '-'):<6} "
                     f"{fmt(o.get('perplexity'), '9.2f')} {fmt(o.get('acc_mean'), '6.3f')} "
                     f"{fmt(o.get('token_ms'), '8.3f')} {fmt(o.get('speedup'), '8.2f')}")
    return "\n".join(lines)
