"""The HTML report: every figure from rows of its kind, and a real headless browser (Debian's chromium) draws
them all with no console errors; a screenshot is taken and is not blank."""

import json
import shutil
import subprocess
import zlib

import pytest

from bench import cli
from bench.results import make_row
from reports.html import FIGURES, build_report


def rows():
    out = []
    base = dict(device="NVIDIA H100 80GB HBM3", dtype="fp16", git_commit="abc1234", batch=1, prompt_len=128)
    for model, scale in (("opt-1.3b", 1.0), ("opt-6.7b", 4.0)):
        for gen in (32, 128):
            for mode, s in (("dense", 0.0), ("shadowllm", 0.5), ("shadowllm", 0.7), ("static", 0.5)):
                c = dict(base, kind="latency", model=model, mode=mode, sparsity=s, gen_len=gen,
                         policy=None if mode == "dense" else "global",
                         granularity="token" if mode == "shadowllm" else None)
                ms = scale * (1.0 - 0.6 * s)
                out += [make_row(**c, metric="token_ms", value=ms, unit="ms"),
                        make_row(**c, metric="prefill_ms", value=3 * scale, unit="ms"),
                        make_row(**c, metric="floor_ms", value=0.8 * ms, unit="ms"),
                        make_row(**c, metric="step_bytes", value=scale * 1e9, unit="B")]
    qb = dict(kind="quality", model="smollm2", device="cpu", dtype="float32", git_commit="abc1234")
    for mode, crit in (("dense", None), ("static", "plainact"), ("shadowllm", "plainact"), ("dejavu", "l2norm")):
        for s in ((0.0,) if mode == "dense" else (0.3, 0.5, 0.7)):
            c = dict(qb, mode=mode, criterion=crit, sparsity=s, policy=None if mode == "dense" else "global")
            out.append(make_row(**c, metric="perplexity", value=14 * (1 + 3 * s * s), unit="ppl", eval="wikitext2",
                                tokens=4095))
            for task in ("copa", "piqa"):
                out.append(make_row(**c, metric="acc", value=0.6 - 0.2 * s, unit="fraction", eval=task, examples=100))
    for kind in ("shadowllm", "dejavu"):
        for m in ("local_heads", "global_heads", "local_neurons", "global_neurons"):
            out.append(make_row(kind="predictor", model="smollm2", mode=kind, criterion="plainact",
                                metric=f"spearman_{m}", value=0.7, unit="rho", device="cpu", dtype="float32"))
    return out


def write(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


def test_every_figure_has_rows_and_captions(tmp_path):
    out, drawn = build_report([write(tmp_path)], tmp_path / "r.html")
    assert all(drawn[name] > 0 for name, _ in FIGURES) and drawn["table2"] > 0, drawn
    page = out.read_text()
    assert "device: NVIDIA H100 80GB HBM3 | dtype: fp16" in page and "commit: abc1234" in page
    assert page.count("<div class='fig'") == len(FIGURES) and "<script src=" not in page  # plotly.js inline


def test_missing_figures_say_so_and_bad_input_is_clear(tmp_path):
    path = tmp_path / "only-latency.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows() if r["kind"] == "latency"))
    out, drawn = build_report([path], tmp_path / "r.html")
    assert drawn["perplexity"] == 0 and "perplexity: no rows for this figure" in out.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "latency"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        build_report([bad], tmp_path / "x.html")
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["report", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.html")])


def _png_is_not_blank(data: bytes) -> bool:
    """Decode the PNG's pixel rows (8-bit RGB/RGBA) and check that they are not all one colour."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width = int.from_bytes(body[:4], "big")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    return len(set(raw[1: 1 + width * 3])) > 1 or len(set(raw[::997])) > 8


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(page, tmp_path, height: int) -> str:
    """The page as headless Chromium leaves it (its script finished, no error recorded), after checking that a
    screenshot of it is not blank; returns the DOM."""
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=240).stdout
    assert 'data-done="1"' in dom, "the page's script did not finish"
    errors = dom.split('<pre id="report-errors">')[1].split("</pre>")[0]
    assert errors == "", errors
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--hide-scrollbars", f"--window-size=1300,{height}", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=240, check=True)
    assert shot.stat().st_size > 20_000 and _png_is_not_blank(shot.read_bytes())
    return dom


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_headless_chromium_draws_every_figure_without_errors(tmp_path):
    out, _ = build_report([write(tmp_path)], tmp_path / "r.html")
    dom = _browse(out, tmp_path, 2600)
    assert dom.count('data-drawn="1"') == len(FIGURES)


def test_rows_of_variants_stay_apart_and_the_newest_measurement_wins():
    from reports.html import _label, prepare_rows

    c = dict(kind="quality", model="smollm2", mode="shadowllm", criterion="plainact", policy="global", sparsity=0.5,
             device="cpu", dtype="float32", metric="perplexity", unit="ppl", eval="wikitext2")
    old = make_row(**c, value=9.0, source="runs/predictors/smollm2/shadowllm-plainact.safetensors",
                   time="2026-01-01T00:00:00+00:00")
    new = make_row(**c, value=8.0, source="runs/predictors/smollm2/shadowllm-plainact.safetensors",
                   time="2026-02-01T00:00:00+00:00")
    layer = make_row(**c, value=7.0, source="runs/predictors/smollm2-layer/shadowllm-plainact.safetensors")
    fp8 = make_row(**c, value=8.5, source="runs/predictors/smollm2/shadowllm-plainact.safetensors",
                   predictor_dtype="fp8")
    got = {_label(r): r["value"] for r in prepare_rows([old, new, layer, fp8])}
    assert got == {"shadowllm plainact global [smollm2]": 8.0, "shadowllm plainact global [smollm2-layer]": 7.0,
                   "shadowllm plainact global fp8-predictor": 8.5}
    o = dict(c, mode="oracle", criterion="l2norm", policy="local")
    one, exact, shard = (make_row(**o, value=v, **tp) for v, tp in
                         ((38.5, {}), (38.5, {"tp": 3, "tp_plan": "exact"}), (69.8, {"tp": 3, "tp_plan": "shard"})))
    got = {_label(r): r["value"] for r in prepare_rows([one, exact, shard])}
    assert got == {"oracle l2norm local": 38.5, "oracle l2norm local TP3-exact": 38.5,
                   "oracle l2norm local TP3-shard": 69.8}
    from reports.html import _variant_of

    assert _variant_of("oracle l2norm local TP3-shard") == "TP3-shard" and _variant_of("oracle l2norm local") is None
    # DejaVu scoring neurons from the MLP input (the default) and from the layer input, each from its own folder
    d = dict(c, mode="dejavu", criterion="l2norm", policy="local")
    mlp = make_row(**d, value=40.0, neuron_input="mlp", source="runs/t/predictors/dejavu-l2norm.safetensors")
    lay = make_row(**d, value=48.0, neuron_input="layer", source="runs/t/predictors-layer/dejavu-l2norm.safetensors")
    got = {_label(r): r["value"] for r in prepare_rows([mlp, lay])}
    assert got == {"dejavu l2norm local": 40.0, "dejavu l2norm local layer-input": 48.0}
    assert _variant_of("dejavu l2norm local layer-input") == "layer-input"
    # a staged ShadowLLM's latency (no predictor file) stays apart from the one predictor's
    lat = dict(kind="latency", model="smollm2-135m", mode="shadowllm", policy="local", sparsity=0.5, device="cpu",
               dtype="fp16", metric="token_ms", unit="ms", granularity="token")
    one, staged = make_row(**lat, value=0.61), make_row(**lat, value=0.68, shadowllm_stages="1,8,15,22")
    got = {_label(r): r["value"] for r in prepare_rows([one, staged])}
    assert got == {"shadowllm local per-token": 0.61, "shadowllm local per-token stages:1,8,15,22": 0.68}
    assert _variant_of("shadowllm local per-token stages:1,8,15,22") == "stages:1,8,15,22"
    # the threshold mode's two paths at batch 1; a row without the field ran select-then-gather
    th = dict(lat, mode="threshold", policy="local")
    fused, sel, older = (make_row(**th, value=v, **kw) for v, kw in
                         ((0.93, {"threshold_path": "fused"}), (1.10, {"threshold_path": "select"}), (1.2, {})))
    assert [_label(r) for r in (fused, sel, older)] == ["threshold local", "threshold local select-path",
                                                          "threshold local select-path"]


def test_report_from_the_committed_results(tmp_path):
    """`shadowbench report results/` (the README's command) on every committed results file: each figure
    has rows, and records of other kinds (the kernel probes) are left out without breaking it."""
    from pathlib import Path

    results = Path(__file__).resolve().parent.parent / "results"
    if not results.is_dir():
        pytest.skip("no results folder beside the tests")
    path, drawn = build_report([results], tmp_path / "r.html")
    assert path.stat().st_size > 100_000
    assert all(n > 0 for n in drawn.values()), drawn


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_committed_results_draw_with_at_most_12_legend_entries_per_figure(tmp_path):
    """The README's report as a browser shows it: every figure drawn, no script error, at most 12 legend entries in
    each figure's first view (the variants behind its menu), and a screenshot that is not blank."""
    from pathlib import Path

    results = Path(__file__).resolve().parent.parent / "results"
    out, drawn = build_report([results], tmp_path / "r.html")
    dom = _browse(out, tmp_path, 1400)
    figures = [n for n in drawn if n not in ("table2", "summary")]
    assert dom.count('data-drawn="1"') == len(figures)
    legends = [int(x.split('"')[1]) for x in dom.split("data-legend=")[1:]]
    assert len(legends) == len(figures) and all(1 <= n <= 12 for n in legends), legends
