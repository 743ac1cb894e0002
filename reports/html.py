"""One self-contained HTML report (plotly.js inline, opens offline) from results rows (JSON Lines).

Figures, each drawn only from rows of its kind, each captioned with the devices, dtypes, models, commits
and row counts it comes from (paper figure numbers of ShadowLLM in brackets):

- latency vs model size [10], with each mode's weight-read floor (the bandwidth roofline) dotted;
- time per generated sequence vs generation length [11];
- per-token latency vs sparsity [12], floors dotted;
- perplexity vs sparsity per mode, criterion and policy [7, 9, 16];
- accuracy per task per mode [8];
- Spearman rho of predicted against true importance [5, 14];
- a table like table 2: per mode at one sparsity, latency (per model) and mean accuracy.

A figure with no rows says so in the page instead of drawing an empty chart. The page records JavaScript
errors in ``#report-errors`` and marks each drawn figure (``data-drawn="1"``), which the browser test reads.
"""

from __future__ import annotations

import html
import json
import warnings
from collections import defaultdict
from pathlib import Path

import plotly.graph_objects as go

from bench.results import complete_rows, parse_rows

MODE_ORDER = {"dense": 0, "oracle": 1, "static": 2, "dejavu": 3, "shadowllm": 4, "hf": 5}


def read_rows(paths) -> list[dict]:
    """Result rows (status ok) of the given files or folders (every .jsonl below). Lines without a ``kind``, a
    ``metric`` and a ``value`` are not rows of the bench schema: they are left out, with a warning naming the file,
    as are a torn last line and the rows of an unfinished case (``bench.results``)."""
    rows = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
        if not files:
            raise ValueError(f"{str(p)!r} holds no .jsonl results files")
        for f in files:
            if not f.is_file():
                raise ValueError(f"results file {str(f)!r} does not exist")
            parsed, torn = parse_rows(f, f.read_text())
            if torn:
                warnings.warn(f"{f}: its last line was cut off mid-write (a run was killed); left out", stacklevel=2)
            kept = complete_rows(parsed)
            if len(kept) < len(parsed):
                warnings.warn(f"{f}: {len(parsed) - len(kept)} row(s) of an unfinished case left out", stacklevel=2)
            foreign = 0
            for row in kept:
                if isinstance(row, dict) and "kind" in row and "metric" in row and "value" in row:
                    rows.append(row)
                else:
                    foreign += 1
            if foreign:
                warnings.warn(f"{f}: {foreign} line(s) without 'kind', 'metric' and 'value' are not result rows; left "
                              "out", stacklevel=2)
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _model_size(rows_by_model, model: str) -> float:
    """Models ordered by weight bytes of a dense step where known, else by name."""
    for r in rows_by_model.get(model, []):
        if r["metric"] == "step_bytes" and r["mode"] == "dense":
            return float(r["value"])
    digits = "".join(ch if ch.isdigit() or ch == "." else " " for ch in model).split()
    try:
        scale = 1e3 if model.lower().endswith("m") else 1e9
        return float(digits[-1]) * scale if digits else 0.0
    except ValueError:
        return 0.0


def _caption(rows) -> str:
    """Devices, dtypes and models of the rows; their commits as a count with the newest (a list of thirty commits
    ran off the figure)."""
    def vals(key):
        return sorted({str(r.get(key)) for r in rows if r.get(key) is not None})

    def short(v, n=4):
        return ", ".join(v[:n]) + (f" +{len(v) - n} more" if len(v) > n else "") if v else "-"

    newest = max(rows, key=lambda r: str(r.get("time") or ""), default={}).get("git_commit")
    commits = vals("git_commit")
    commit = f"{len(commits)} commits, newest {newest}" if len(commits) > 1 else (commits[0] if commits else "-")
    return (f"device: {short(vals('device'), 2)} | dtype: {short(vals('dtype'), 3)} | model: {short(vals('model'))} | "
            f"commit: {commit} | {len(rows)} rows")


# Words a label carries when its row is not the canonical setting (batch 1, prompt 128, 128 tokens, default flags,
# predictors of the default folder): each names a group of traces that the figure's menu shows instead.
VARIANT_MARKERS = ("fp8-predictor", "no-PDL", "own-GEMV", "batch-union", "per-prompt", "kv:always", "layer-input",
                   "residual-input", "stages:", "select-path", "neurons:threshold",
                   "heads-only", "neurons-only", "dense-context", "-shot", "heads ", "TP", "[")
MAX_LEGEND = 12


def _variant_of(name: str) -> str | None:
    """The variant group of a trace name, None for the canonical setting."""
    for m in VARIANT_MARKERS:
        if m in name:
            if m == "[":
                return "predictor folder " + name[name.index("["):name.index("]") + 1]
            if m == "-shot":
                return next(w for w in name.split() if w.endswith("-shot"))
            if m == "TP":
                return next(w for w in name.split() if w.startswith("TP"))
            if m == "stages:":
                return next(w for w in name.split() if w.startswith("stages:"))
            return m.strip()
    for w in name.split():
        if w.startswith("gen") and w[3:].isdigit() and w != "gen128":
            return w
    return None


def variants_menu(fig) -> None:
    """Show the canonical traces and put every variant group one click away: traces are grouped by their variant
    (see VARIANT_MARKERS), each group split into pages of at most 12, the first page shown and a dropdown choosing
    any other. Reference traces (dense, floors, the oracle) stay in every view."""
    groups: dict = {}
    floors: dict = {}
    for i, t in enumerate(fig.data):
        name = t.name or ""
        if name.endswith(" floor"):  # drawn with its series, out of the legend (the title says what dotted is)
            t.showlegend = False
            floors.setdefault(name[: -len(" floor")], []).append(i)
            continue
        ref = name.endswith("(reference)") or name.endswith("(ceiling)")
        groups.setdefault("reference" if ref else (_variant_of(name) or "canonical"), []).append(i)
    ref = groups.pop("reference", [])
    if len(groups.get("canonical", [])) < 2 and len(groups) > 1:  # a lone canonical trace (dense) joins every view
        ref += groups.pop("canonical", [])
    order = (["canonical"] if "canonical" in groups else []) + sorted(g for g in groups if g != "canonical")
    room = max(1, MAX_LEGEND - min(len(ref), MAX_LEGEND // 2))
    pages = []
    for g in order:
        idx = [i for i in groups[g] if fig.data[i].showlegend is not False]
        for k in range(0, len(idx), room):
            part = idx[k: k + room]
            part += [j for i in part for j in floors.get(fig.data[i].name, [])]
            label = g if len(idx) <= room else f"{g} ({k // room + 1}/{-(-len(idx) // room)})"
            pages.append((label, part))
    if not pages:
        return
    shown_ref = ref[: MAX_LEGEND - len(pages[0][1])]
    for i, t in enumerate(fig.data):
        t.visible = i in pages[0][1] or i in shown_ref
    if len(pages) > 1:
        def visible(part):
            shown = set(part) | set(ref[: MAX_LEGEND - len(part)])
            return [i in shown for i in range(len(fig.data))]

        buttons = [dict(label=label, method="update", args=[{"visible": visible(part)}]) for label, part in pages]
        fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.02, xanchor="left", y=1.16,
                                            yanchor="top", showactive=True)])


def _budget_label(hs, ns) -> list[str]:
    """A label's word for head and neuron budgets set apart (none where they are one sparsity)."""
    if hs is None or ns is None or hs == ns:
        return []
    return ["neurons-only" if hs == 0 else "heads-only" if ns == 0 else f"heads {hs:g}/neurons {ns:g}"]


def _base_label(r) -> str:
    parts = [r.get("mode") or r.get("kind") or "row"]  # kernel rows have no mode
    if r.get("criterion"):
        parts.append(r["criterion"])
    if r.get("policy"):
        parts.append(r["policy"])
    ex = r.get("extra") or {}
    g = ex.get("granularity")
    if g and r["mode"] in ("dejavu", "shadowllm"):
        parts.append(f"per-{g}")
    # variants of a case that results files keep side by side
    if r.get("mode") == "dejavu" and (ex.get("neuron_input") or (ex.get("settings") or {}).get("neuron_input")) \
            == "layer":  # DejaVu's neurons scored from the layer input instead of the MLP input
        parts.append("layer-input")
    if r.get("mode") == "shadowllm" and ex.get("shadowllm_input") == "residual":  # reads layer 1's input
        parts.append("residual-input")
    if r.get("mode") == "shadowllm" and ex.get("shadowllm_stages"):  # one net per stage (models.predictors)
        parts.append(f"stages:{ex['shadowllm_stages']}")
    if ex.get("neuron_rule") == "threshold":  # each layer's neurons above a calibrated threshold (models.plan)
        parts.append("neurons:threshold")
    if r.get("kind") == "latency" and r.get("mode") == "threshold" and ex.get("threshold_path", "select") == "select":
        parts.append("select-path")  # an index list before each GEMV; rows without the field ran this way
    if ex.get("predictor_dtype") == "fp8":
        parts.append("fp8-predictor")
    if ex.get("batch_rule") == "union" and (r.get("batch") or 1) > 1:
        parts.append("batch-union")
    if ex.get("pdl") is False:
        parts.append("no-PDL")
    if ex.get("dense_gemv") == "triton":
        parts.append("own-GEMV")
    if ex.get("shots"):
        parts.append(f"{ex['shots']}-shot")
    parts += _budget_label(ex.get("head_sparsity"), ex.get("neuron_sparsity"))
    if ex.get("kv_rule") == "always":
        parts.append("kv:always")
    if (ex.get("tp") or 1) > 1:  # tensor-parallel rows: world size and plan rule (models.tp)
        parts.append(f"TP{ex['tp']}-{ex.get('tp_plan') or 'exact'}")
    if r.get("kind") == "quality" and ex.get("eval") != "wikitext2" and ex.get("sparse_prefix") is False \
            and r.get("mode") != "dense":
        parts.append("dense-context")
    if r.get("kind") == "predictor" and ex.get("baseline"):
        parts.append(f"baseline:{ex['baseline']}")
    return " ".join(parts)


def _label(r) -> str:
    return (r.get("extra") or {}).get("_label") or _base_label(r)


def prepare_rows(rows: list[dict]) -> list[dict]:
    """Labels that tell apart rows of one case made from different predictor or importance files (the
    file's folder is added when a label has several), and the newest row of each measurement."""
    from pathlib import PurePath

    dirs = defaultdict(set)
    for r in rows:
        src = (r.get("extra") or {}).get("source")
        if r.get("kind") == "quality" and src:
            dirs[(r["model"], _base_label(r))].add(PurePath(src).parent.name)
    newest = {}
    for r in rows:
        ex = dict(r.get("extra") or {})
        label = _base_label(r)
        src = ex.get("source")
        if r.get("kind") == "quality" and src and len(dirs[(r["model"], label)]) > 1:
            label = f"{label} [{PurePath(src).parent.name}]"
        ex["_label"] = label
        r = {**r, "extra": ex}
        key = (r.get("kind"), r.get("model"), label, r.get("sparsity"), r.get("metric"), r.get("gen_len"),
               r.get("batch"), r.get("prompt_len"), r.get("dtype"), r.get("device"), ex.get("eval"), ex.get("op"),
               ex.get("variant"), ex.get("normalisation"), ex.get("log"), ex.get("head_sparsity"),
               ex.get("neuron_sparsity"), ex.get("kv_rule"), ex.get("sparse_prefix"), ex.get("baseline"))
        if key not in newest or str(r.get("time") or "") >= str(newest[key].get("time") or ""):
            newest[key] = r
    return list(newest.values())


def _layout(fig, title, xlab, ylab, rows):
    fig.update_layout(title=dict(text=f"{title}<br><sup>{html.escape(_caption(rows))}</sup>"), xaxis_title=xlab,
                      yaxis_title=ylab, template="plotly_white", height=460, legend=dict(font=dict(size=10)))
    return fig


def fig_latency_vs_model(rows, sparsity=0.5):
    # the generation length measured on the most models (ties: the longer)
    per_gen = defaultdict(set)
    for x in rows:
        if x.get("kind") == "latency" and x["metric"] == "token_ms" and x.get("batch", 1) == 1:
            per_gen[x.get("gen_len") or 0].add(x["model"])
    gen = max(per_gen, key=lambda g: (len(per_gen[g]), g), default=None)
    lat = [r for r in rows if r.get("kind") == "latency" and r["metric"] in ("token_ms", "floor_ms", "step_bytes")
           and r["sparsity"] in (0.0, sparsity) and r.get("gen_len") == gen and r.get("batch", 1) == 1]
    if not any(r["metric"] == "token_ms" for r in lat):
        return None, lat
    by_model = defaultdict(list)
    for r in lat:
        by_model[r["model"]].append(r)
    models = sorted(by_model, key=lambda m: _model_size(by_model, m))
    if len(models) < 2:  # one model is one x value: the first screen and the other figures say more
        return None, []
    fig = go.Figure()
    series = defaultdict(dict)
    floors = defaultdict(dict)
    for r in lat:
        if r["metric"] == "token_ms":
            series[_label(r)][r["model"]] = r["value"]
        elif r["metric"] == "floor_ms":
            floors[_label(r)][r["model"]] = r["value"]
    for name in sorted(series, key=lambda s: (MODE_ORDER.get(s.split()[0], 9), s)):
        pts = series[name]
        fig.add_trace(go.Scatter(x=[m for m in models if m in pts], y=[pts[m] for m in models if m in pts],
                                 mode="lines+markers", name=name))
        if name in floors:
            f = floors[name]
            fig.add_trace(go.Scatter(x=[m for m in models if m in f], y=[f[m] for m in models if m in f],
                                     mode="lines", line=dict(dash="dot", width=1), name=f"{name} floor",
                                     legendgroup="floors"))
    used = [r for r in lat if r["metric"] == "token_ms"]
    return _layout(fig, f"Per-token latency vs model size (s={sparsity}; dotted: weight-read floor)", "model",
                   "ms / token (median)", used), used


def fig_generation_time(rows):
    tok = {(r["model"], _label(r), r["sparsity"], r["gen_len"]): r for r in rows
           if r.get("kind") == "latency" and r["metric"] == "token_ms"}
    pre = {(r["model"], _label(r), r["sparsity"], r["gen_len"]): r["value"] for r in rows
           if r.get("kind") == "latency" and r["metric"] == "prefill_ms"}
    gens = {k[3] for k in tok}
    if len(gens) < 2:
        return None, []
    fig = go.Figure()
    series = defaultdict(dict)
    for k, r in tok.items():
        if k in pre and r["sparsity"] in (0.0, 0.5):
            series[f"{k[0]} {k[1]}"][k[3]] = pre[k] + r["value"] * (k[3] - 1)
    for name in sorted(series):
        pts = series[name]
        xs = sorted(pts)
        fig.add_trace(go.Scatter(x=xs, y=[pts[x] / 1e3 for x in xs], mode="lines+markers", name=name))
    used = [r for k, r in tok.items() if len(series.get(f"{k[0]} {k[1]}", {})) > 0]
    return _layout(fig, "Time per generated sequence vs generation length (prefill + decode, s=0.5)",
                   "generated tokens", "seconds per sequence", used), used


def fig_latency_vs_sparsity(rows):
    lat = [r for r in rows if r.get("kind") == "latency" and r["metric"] in ("token_ms", "floor_ms")
           and r["mode"] != "hf"]
    sparsities = {r["sparsity"] for r in lat if r["sparsity"] > 0}
    if len(sparsities) < 2:
        return None, []
    fig = go.Figure()
    series, floors = defaultdict(dict), defaultdict(dict)
    for r in lat:
        key = f"{r['model']} {_label(r)} gen{r['gen_len']}"
        (series if r["metric"] == "token_ms" else floors)[key][r["sparsity"]] = r["value"]
    dense = {k: v[0.0] for k, v in series.items() if k.split()[1] == "dense" and 0.0 in v}
    for name in sorted(series):
        if name.split()[1] == "dense":
            continue
        pts = series[name]
        if len(pts) < 2:
            continue
        xs = sorted(pts)
        fig.add_trace(go.Scatter(x=xs, y=[pts[x] for x in xs], mode="lines+markers", name=name))
        if name in floors:
            fx = sorted(floors[name])
            fig.add_trace(go.Scatter(x=fx, y=[floors[name][x] for x in fx], mode="lines", name=f"{name} floor",
                                     line=dict(dash="dot", width=1), legendgroup="floors"))
    shown = {(n.split()[0], n.split()[-1]) for n in series if n.split()[1] != "dense" and len(series[n]) >= 2}
    xs_all = sorted(sparsities)
    for name, v in sorted(dense.items()):  # the dense time of each model drawn, as a trace in data units
        if (name.split()[0], name.split()[-1]) in shown:
            fig.add_trace(go.Scatter(x=[xs_all[0], xs_all[-1]], y=[v, v], mode="lines", name=f"{name} (reference)",
                                     line=dict(dash="dash", color="gray", width=1)))
    used = [r for r in lat if r["metric"] == "token_ms"]
    return _layout(fig, "Per-token latency vs sparsity (dotted: floor; dashed: dense)", "sparsity",
                   "ms / token (median)", used), used


def fig_perplexity(rows):
    q = [r for r in rows if r.get("kind") == "quality" and r["metric"] == "perplexity"]
    if not q:
        return None, []
    fig = go.Figure()
    series = defaultdict(dict)
    dense = {}
    for r in q:
        if r["mode"] == "dense":
            dense[r["model"]] = r["value"]
        series[f"{r['model']} {_label(r)}"][r["sparsity"]] = r["value"]
    for name in sorted(series, key=lambda s: (MODE_ORDER.get(s.split()[1], 9), s)):
        pts = series[name]
        if name.split()[1] == "dense":
            continue
        xs = sorted(pts)
        oracle = name.split()[1] == "oracle"  # the contextual ceiling: what a perfect predictor would reach
        fig.add_trace(go.Scatter(x=xs, y=[pts[x] for x in xs], mode="lines+markers",
                                 name=f"{name} (ceiling)" if oracle else name,
                                 line=dict(dash="dot", color="black") if oracle else None))
    xs_all = sorted({r["sparsity"] for r in q} - {0.0}) or [0.0]
    for model, v in dense.items():  # a trace in data units (a log axis reads an hline annotation's y as log10)
        fig.add_trace(go.Scatter(x=[min(xs_all), max(xs_all)], y=[v, v], mode="lines",
                                 line=dict(dash="dash", color="gray"), name=f"{model} dense {v:.2f} (reference)"))
    fig.update_yaxes(type="log")
    tokens = sorted({(r.get("extra") or {}).get("tokens") for r in q} - {None})
    return _layout(fig, f"WikiText-2 perplexity vs sparsity ({', '.join(map(str, tokens))} tokens scored)",
                   "sparsity", "perplexity (log scale)", q), q


def fig_accuracy(rows, sparsity=0.5):
    q = [r for r in rows if r.get("kind") == "quality" and r["metric"] == "acc"
         and r["sparsity"] in (0.0, sparsity)]
    if not q:
        return None, []
    tasks = sorted({r["extra"]["eval"] for r in q})
    fig = go.Figure()
    series = defaultdict(dict)
    for r in q:
        series[f"{r['model']} {_label(r)}"][r["extra"]["eval"]] = r["value"]
    for name in sorted(series, key=lambda s: (MODE_ORDER.get(s.split()[1], 9), s)):
        pts = series[name]
        fig.add_trace(go.Bar(x=tasks, y=[pts.get(t) for t in tasks], name=name))
    fig.update_layout(barmode="group")
    n = sorted({(r["extra"]["eval"], r["extra"].get("examples")) for r in q})
    return _layout(fig, f"Zero-shot accuracy per task at s={sparsity} (examples: "
                   + ", ".join(f"{t} {k}" for t, k in n) + ")", "task", "acc", q), q


def fig_spearman(rows):
    p = [r for r in rows if r.get("kind") == "predictor" and str(r["metric"]).startswith("spearman_")]
    if not p:
        return None, []
    cats = sorted({r["metric"].replace("spearman_", "") for r in p})
    fig = go.Figure()
    series = defaultdict(dict)
    for r in p:
        norm = (r.get("extra") or {}).get("normalisation")
        name = f"{r['model']} {r['mode']} {r['criterion']}" + (f" ({norm}-normalised)" if norm else "")
        series[name][r["metric"].replace("spearman_", "")] = r["value"]
    for name in sorted(series):
        fig.add_trace(go.Bar(x=cats, y=[series[name].get(c) for c in cats], name=name))
    fig.update_layout(barmode="group")
    return _layout(fig, "Spearman rho, predicted vs true importance (held-out examples; local = within a layer)",
                   "scope and unit", "Spearman rho", p), p


def table2(rows, sparsity=0.5) -> tuple[str, list]:
    """Like the paper's table 2, at one sparsity: one line per quality configuration (mode, criterion, policy and
    predictor variant) with its mean accuracy over the tasks present, beside the per-token latency of the same
    decode configuration in the canonical setting (batch 1, prompt 128, 128 tokens, default flags, predictions every
    token; the newest row), per latency model. Latency does not depend on the criterion (same predictor widths), so
    configurations that differ only in it share their latency cells."""
    lat = [r for r in rows if r.get("kind") == "latency" and r["metric"] == "token_ms" and r["mode"] != "hf"
           and r["sparsity"] in (0.0, sparsity) and all(r.get(k) == v for k, v in CANONICAL.items())
           and _variant_of(_label(r)) is None]
    acc = [r for r in rows if r.get("kind") == "quality" and r["metric"] == "acc" and r["sparsity"] in (0.0, sparsity)]
    if not lat and not acc:
        return "", []
    newest = {}
    for r in sorted(lat, key=lambda r: str(r.get("time") or "")):
        newest[(r["model"], r["mode"], r.get("policy"))] = r["value"]
    cols_l = sorted({r["model"] for r in lat})
    by_label = defaultdict(list)
    for r in acc:
        by_label[(r["model"], r["mode"], r.get("policy"), _label(r))].append(r["value"])
    keys = sorted(by_label, key=lambda k: (k[0], MODE_ORDER.get(k[1], 9), k[3]))
    scored = {(k[1], k[2]) for k in keys}  # decode configurations timed but not scored get a line of their own
    keys += sorted({(None, r["mode"], r.get("policy"), " ".join(x for x in (r["mode"], r.get("policy")) if x))
                    for r in lat if (r["mode"], r.get("policy")) not in scored},
                   key=lambda k: (MODE_ORDER.get(k[1], 9), k[3]))
    head = "<th>quality model</th><th>configuration</th><th>mean acc (tasks)</th>"
    head += "".join(f"<th>{html.escape(m)}<br>ms/token</th>" for m in cols_l)
    body = []
    for model, mode, pol, label in keys:
        v = by_label.get((model, mode, pol, label), [])
        cells = [f"{sum(v) / len(v):.3f} ({len(v)})" if v else "-"]
        cells += [f"{newest[(m, mode, pol)]:.3f}" if (m, mode, pol) in newest else "-" for m in cols_l]
        body.append(f"<tr><td>{html.escape(model or '-')}</td><td>{html.escape(label)}</td>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    caption = html.escape(_caption(lat + acc))
    return (f"<h2>Accuracy and latency per configuration at s={sparsity} (like table 2)</h2><p class='cap'>{caption}. "
            "Accuracy: mean over the tasks present (their count in brackets). Latency: the same mode and policy "
            "decoding with predictions every token, batch 1, prompt 128, 128 tokens, default flags.</p>"
            f"<table><tr>{head}</tr>{''.join(body)}</table>"), lat + acc


CANONICAL = {"batch": 1, "prompt_len": 128, "gen_len": 128}


def summary(rows) -> tuple[str, list]:
    """The first screen: for the canonical setting (batch 1, prompt 128, 128 tokens, default flags), per model the
    dense ms/token and its weight-read floor ratio, and each mode's speedup over dense at each sparsity, beside the
    perplexity of the same configuration where the model also has quality rows. CPU rows are said not to be GPU
    speed."""
    lat = [r for r in rows if r.get("kind") == "latency" and r["metric"] in ("token_ms", "floor_ratio")
           and all(r.get(k) == v for k, v in CANONICAL.items()) and _variant_of(_label(r)) is None
           and r["mode"] != "hf"]
    if not any(r["metric"] == "token_ms" for r in lat):
        return "", []
    same = {"smollm2": "smollm2-135m"}  # the loader's name of a registry model
    ppl = {}
    # the newest l2norm row of each configuration, from any predictor folder (budgets, kv rule: other settings)
    for r in sorted((r for r in rows if r.get("kind") == "quality" and r["metric"] == "perplexity"
                     and r.get("criterion") in (None, "l2norm")
                     and (_variant_of(_label(r)) or "predictor folder").startswith("predictor folder")),
                    key=lambda r: str(r.get("time") or "")):
        ppl[(same.get(r["model"], r["model"]), r["mode"], r.get("policy"), r["sparsity"])] = (
            r["value"], r.get("criterion"))
    tok = {(r["model"], _label(r), r["sparsity"]): r for r in lat if r["metric"] == "token_ms"}
    floor = {(r["model"], _label(r), r["sparsity"]): r["value"] for r in lat if r["metric"] == "floor_ratio"}
    models = sorted({k[0] for k in tok}, key=lambda m: _model_size({m: [r for r in rows if r.get("model") == m
                                                                         and r.get("kind") == "latency"]}, m))
    cols = sorted({(k[1], k[2]) for k in tok if not k[1].startswith("dense")},
                  key=lambda c: (MODE_ORDER.get(c[0].split()[0], 9), c))
    head = "".join(f"<th>{html.escape(lab)}<br>s={s:g}</th>" for lab, s in cols)
    body = []
    for m in models:
        d = tok.get((m, "dense", 0.0))
        if d is None:
            continue
        cpu = str(d["device"]).startswith("cpu")
        cells = []
        for lab, s in cols:
            r = tok.get((m, lab, s))
            if r is None:
                cells.append("-")
                continue
            q = ppl.get((m, r["mode"], r.get("policy"), s))
            cells.append(f"{d['value'] / r['value']:.2f}x"
                         + (f"<br><span class='cap'>ppl {q[0]:.1f} ({q[1]})</span>" if q else ""))
        fr = floor.get((m, "dense", 0.0))
        dq = (ppl.get((m, "dense", None, 0.0)) or (None,))[0]
        body.append(f"<tr><td>{html.escape(m)}{' (CPU: not GPU speed)' if cpu else ''}</td>"
                    f"<td>{d['value']:.3f}{f'<br><span class=cap>ppl {dq:.1f}</span>' if dq else ''}</td>"
                    f"<td>{f'{fr:.2f}x' if fr else '-'}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    used = list(tok.values())
    return (f"<h2>At a glance: speedup over dense per token</h2><p class='cap'>batch 1, prompt 128, 128 tokens, "
            f"default flags; {html.escape(_caption(used))}. Perplexity where the same model and configuration was "
            "scored.</p><table><tr><th>model</th><th>dense ms/token</th><th>x floor</th>" + head + "</tr>"
            + "".join(body) + "</table>"), used


LOSS_LEVELS = (0.05, 0.10, 0.25, 0.50, 1.00)


def _pareto_variant(o) -> str:
    """What sets a configuration apart beyond its mode, criterion and policy: when it predicts, the key/value rule,
    one budget apart from the other, and on a GPU what its timed step ran dense layers with (one curve each; a
    speedup is over the dense step of the same engine)."""
    parts = [f"per-{o['granularity']}"] if o.get("granularity") else []
    if o.get("kv_rule") == "always" and o.get("mode") != "dense":  # (a dense step computes every key and value)
        parts.append("kv:always")
    if o.get("shadowllm_stages"):
        parts.append(f"stages:{o['shadowllm_stages']}")
    if o.get("neuron_rule") == "threshold":
        parts.append("neurons:threshold")
    parts += _budget_label(o.get("head_sparsity"), o.get("neuron_sparsity"))
    if o.get("dense_gemv") and not str(o.get("device", "")).startswith("cpu"):
        parts.append("dense:" + ("ours" if o["dense_gemv"] == "triton" else o["dense_gemv"]))
    return " ".join(parts)


def fig_pareto(rows):
    """Speedup over dense against perplexity, one curve per mode, for configurations whose quality and latency were
    measured together (``shadowbench pareto``: rows joined by ``extra.config_key``); the oracle's perplexity as
    reference lines (it has no latency); and a table of the best speedup each mode reaches within 5, 10, 25, 50 and
    100% of dense perplexity. Configurations that differ in granularity, key/value rule or budgets are curves apart."""
    from bench.pareto import join

    recs = [o for o in join(rows) if o.get("perplexity")]
    timed = [o for o in recs if o.get("speedup")]
    if not timed:
        return None, [], ""
    fig = go.Figure()
    series = defaultdict(list)
    folders = defaultdict(set)  # files of one mode from several folders: the folder joins the curve's name
    for o in timed:
        folders[(o["model"], o["mode"], o["criterion"], o["policy"])].add(o.get("source_folder"))
    for o in timed:
        var = _pareto_variant(o)
        if len(folders[(o["model"], o["mode"], o["criterion"], o["policy"])]) > 1 and o.get("source_folder"):
            var = f"{var} [{o['source_folder']}]".strip()
        series[(o["model"], o["mode"], o["criterion"], o["policy"], var)].append(o)
    for (model, mode, crit, pol, var), pts in sorted(series.items(),
                                                     key=lambda kv: (MODE_ORDER.get(kv[0][1], 9), kv[0])):
        pts = sorted(pts, key=lambda o: o["sparsity"])
        name = " ".join(str(x) for x in (model, mode, crit, pol, var) if x)
        fig.add_trace(go.Scatter(x=[o["perplexity"] for o in pts], y=[o["speedup"] for o in pts],
                                 mode="markers" if mode == "dense" else "lines+markers", name=name,
                                 text=[f"s={o['sparsity']:g}" for o in pts]))
    for o in recs:
        if o["mode"] == "oracle":
            fig.add_trace(go.Scatter(x=[o["perplexity"]] * 2, y=[0.9, max(p["speedup"] for p in timed)],
                                     mode="lines", line=dict(dash="dot", color="black"),
                                     name=" ".join(x for x in (f"{o['model']} oracle {o['criterion']} {o['policy']}",
                                                               f"s={o['sparsity']:g}", _pareto_variant(o),
                                                               "(ceiling)") if x)))
    fig.update_xaxes(type="log")
    rows_used = [r for r in rows if (r.get("extra") or {}).get("config_key")]
    dense = {o["model"]: o["perplexity"] for o in recs if o["mode"] == "dense"}
    head = "".join(f"<th>ppl loss &le; {int(x * 100)}%</th>" for x in LOSS_LEVELS)
    body = []
    for (model, mode, crit, pol, var), pts in sorted(series.items(),
                                                     key=lambda kv: (MODE_ORDER.get(kv[0][1], 9), kv[0])):
        if mode == "dense" or model not in dense:
            continue
        cells = []
        for x in LOSS_LEVELS:
            ok = [o["speedup"] for o in pts if o["perplexity"] <= dense[model] * (1 + x)]
            cells.append(f"<td>{max(ok):.2f}x</td>" if ok else "<td>-</td>")
        body.append(f"<tr><td>{html.escape(' '.join(str(v) for v in (model, mode, crit, pol, var) if v))}</td>"
                    + "".join(cells) + "</tr>")
    table = (f"<h3>Best speedup over dense within a perplexity loss</h3><table><tr><th>configuration</th>{head}</tr>"
             + "".join(body) + "</table>") if body else ""
    cpu = any(str(o.get("device", "")).startswith("cpu") for o in timed)
    title = ("Speedup over dense vs perplexity (quality and latency of the same configurations"
             + ("; CPU latency: the PyTorch references, not GPU speed)" if cpu else ")"))
    return (_layout(fig, title,
                    "WikiText-2 perplexity (log scale)", "speedup per token over dense", rows_used), rows_used, table)


FIGURES = (("latency-vs-model", fig_latency_vs_model), ("generation-time", fig_generation_time),
           ("latency-vs-sparsity", fig_latency_vs_sparsity), ("perplexity", fig_perplexity),
           ("accuracy", fig_accuracy), ("spearman", fig_spearman))


def output_path(paths, out) -> Path:
    """Where the report goes: ``out``, or ``out/report.html`` for a folder. Never one of the inputs (a results file
    overwritten by HTML is lost), never a .jsonl file."""
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    inputs = set()
    for p in map(Path, paths):
        inputs |= {f.resolve() for f in p.rglob("*.jsonl")} if p.is_dir() else {p.resolve()}
    if out.resolve() in inputs or out.suffix == ".jsonl":
        raise ValueError(f"-o {str(out)!r} is a results file (an input, or .jsonl): the report would overwrite it; "
                         "give an .html path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the report's folder {str(out.parent)!r}: {err.strerror or err}") from None
    return out


def build_report(paths, out, title="shadowbench report") -> tuple[Path, dict]:
    """Write the report; returns its path and, per figure, the number of rows drawn (0: no rows)."""
    from plotly.offline import get_plotlyjs

    out = output_path(paths, out)
    rows = read_rows(paths)
    if not rows:
        raise ValueError(f"no ok rows in {[str(p) for p in paths]}")
    rows = prepare_rows(rows)
    parts, drawn = [], {}
    for name, fn in FIGURES:
        fig, used = fn(rows)
        drawn[name] = len(used) if fig is not None else 0
        if fig is not None:
            variants_menu(fig)
        if fig is None:
            parts.append(f"<div class='missing' id='{name}'>{name}: no rows for this figure in these results</div>")
            continue
        payload = json.dumps(fig.to_plotly_json(), default=_json_default).replace("</", "<\\/")
        parts.append(f"<div class='fig' id='{name}'></div><script type='application/json' id='{name}-spec'>"
                     f"{payload}</script>")
    fig, used, pareto_table = fig_pareto(rows)
    if fig is not None:  # only where quality and latency rows of the same configurations exist
        drawn["pareto"] = len(used)
        variants_menu(fig)
        payload = json.dumps(fig.to_plotly_json(), default=_json_default).replace("</", "<\\/")
        parts.insert(0, f"<div class='fig' id='pareto'></div><script type='application/json' id='pareto-spec'>"
                        f"{payload}</script>{pareto_table}")
    table, used = table2(rows)
    drawn["table2"] = len(used)
    glance, used = summary(rows)
    if glance:
        drawn["summary"] = len(used)
    sources = ", ".join(html.escape(str(p)) for p in paths)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message)));
const _err = console.error; console.error = (...a) => {{ window.__errors.push(a.join(" ")); _err(...a); }};
</script>
<script>{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}} .cap{{color:#555;font-size:12px}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}} .missing{{color:#a00;margin:16px 0}}</style></head>
<body><h1>{html.escape(title)}</h1><p class="cap">from {sources}; {len(rows)} ok rows</p>
{glance}
{''.join(parts)}
{table}
<pre id="report-errors"></pre>
<script>
const figs = document.querySelectorAll("div.fig");
Promise.all(Array.from(figs).map(div => {{
  const spec = JSON.parse(document.getElementById(div.id + "-spec").textContent);
  return Plotly.newPlot(div, spec.data, spec.layout, {{responsive: true}}).then(() => {{
    div.dataset.drawn = "1";
    div.dataset.legend = div.querySelectorAll(".legend .traces").length;
  }});
}})).catch(e => window.__errors.push(String(e))).finally(() => {{
  document.getElementById("report-errors").textContent = window.__errors.join("\\n");
  document.body.dataset.done = "1";
}});
</script></body></html>"""
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot write the report to {str(out)!r}: {err.strerror or err}") from None
    return out, drawn


def _json_default(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
