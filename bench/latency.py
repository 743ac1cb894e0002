"""Per-token decode latency of every mode, Hugging Face ``generate`` and the weight-read floor.

Each case generates ``gen_len`` tokens greedily after a ``prompt_len`` prompt, twice; the second run
counts. Every decode step is one CUDA-graph replay timed with CUDA events; a row gives the median over
the steps (p20/p80/mean in ``extra``). Weights and predictors are random (shapes of the named model),
which does not change the work a step does; rows say ``weights: random``.

The floor is the bytes of weights the step reads (the live heads and neurons of the plan, the
predictor when it runs every token, embeddings and the LM head) divided by the measured copy
bandwidth. The predictor's own time is measured separately, as a captured graph with a cold L2.
"""

from __future__ import annotations

import statistics
import traceback
from dataclasses import dataclass

import torch

from models.config import DecoderConfig
from models.generate import Generator
from models.loading import random_model
from models.modes import MODES, NO_DECODE, make_mode, mode_variants, random_importance
from models.ops import get_ops, unfused_norms
from models.opt import OPTDecoder
from models.plan import NEURON_RULES
from models.registry import get_spec
from shadow_kernels import tuned

from .kernels import DTYPES
from .results import environment, git_commit, make_row, row_writer
from .timing import copy_bandwidth, percentile, time_op

LATENCY_MODES = ("dense", "static", "dejavu", "shadowllm", "threshold", "hf")
DENSE_GEMVS = OPTDecoder.DENSE_GEMVS + ("auto",)  # what --dense-gemv takes


def auto_dense_gemv(family: str, weight_bytes: int, copy_bytes: int, device, world: int = 1) -> str:
    """The faster dense GEMV engine that fits (``auto``). Our GEMV (``triton``) ran the dense layers faster than
    cuBLAS on the H100 at every size measured: OPT-1.3B 1.11 against 1.60 ms per token, 6.7B 4.88 against 5.45, 13B
    9.16 against 9.96 (sweeps at 49c02d5 and 2e8d454); SmolLM2-135M (Llama) 0.556 against 1.058 (9391a90; Llama-2
    sizes not timed). Llama's path copies no weight, so it always takes ``triton`` on a GPU. OPT's keeps a
    natural-layout copy of fc2 (``copy_bytes``): ``triton`` where the weights, the copy and a tenth of the memory (at
    least 4 GiB) for the cache and workspaces fit (OPT-30B in fp16 does not on 80 GB), else ``cublas``. The CPU
    always takes ``cublas``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cublas"
    if family == "llama":
        return "triton"
    total = torch.cuda.get_device_properties(device).total_memory
    return "triton" if (weight_bytes + copy_bytes) / world + max(4 << 30, total // 10) <= total else "cublas"


def resolve_dense_gemv(choice: str, name: str, dtype: torch.dtype, device, world: int = 1) -> str:
    """The dense GEMV engine of registry model ``name``: ``choice`` itself, or for ``auto``
    :func:`auto_dense_gemv` from the model's shape."""
    if choice != "auto":
        return choice
    spec = get_spec(name)
    el = torch.empty((), dtype=dtype).element_size()
    weights = (spec.layer_weight_params() * spec.n_layers + (spec.vocab + spec.max_positions) * spec.hidden) * el
    copy = spec.hidden * spec.ffn * spec.n_layers * el
    return auto_dense_gemv(spec.family, weights, copy, device, world)


@dataclass(frozen=True)
class LatencyCase:
    model: str
    mode: str
    sparsity: float
    policy: str | None
    granularity: str | None
    gen_len: int
    head_sparsity: float | None = None  # None: ``sparsity``
    neuron_sparsity: float | None = None

    def budgets(self) -> tuple[float, float]:
        """The head and neuron sparsities this case runs at."""
        s = self.sparsity
        return (s if self.head_sparsity is None else self.head_sparsity,
                s if self.neuron_sparsity is None else self.neuron_sparsity)

    def key(self):
        return (self.model, self.mode, self.sparsity, self.policy, self.granularity, self.gen_len, *self.budgets())


def latency_cases(models, modes, sparsities, gens, granularities, shadowllm_policies=("global", "local"),
                  head_sparsity=None, neuron_sparsity=None):
    out = []
    for model in models:
        for gen in gens:
            for mode in modes:
                dense = mode in ("dense", "hf")
                budgets = (None, None) if dense else (head_sparsity, neuron_sparsity)
                for s in ([0.0] if dense else [s for s in sparsities if s != 0.0]):
                    out += [LatencyCase(model, mode, s, p, g, gen, *budgets) for p, g in
                            mode_variants(mode, policies=shadowllm_policies, granularities=granularities, timing=True)]
    return out


def mode_of(case: LatencyCase, cfg: DecoderConfig, seed: int = 0, batch_rule: str = "mean",
               predictor_dtype: str = "model", kv_rule: str = "skip", thresholds=None, neuron_input: str = "mlp",
               shadowllm_input: str = "residual", shadowllm_stages: str | None = None, neuron_rule: str = "topk"):
    """The mode of a latency case: random static scores or random predictors of the trained shapes, or the threshold
    mode's ``thresholds`` (:func:`random_thresholds`). ``kv_rule`` applies to the sparse modes (a dense step
    computes every key and value)."""
    if case.mode not in MODES:
        raise ValueError(f"mode must be one of {LATENCY_MODES}, got {case.mode!r}")
    if case.mode in NO_DECODE:
        raise ValueError(f"mode {case.mode!r} has no latency: {NO_DECODE[case.mode]}; timed modes: "
                         f"{', '.join(LATENCY_MODES)}")
    return make_mode(case.mode, sparsity=case.sparsity, policy=case.policy, granularity=case.granularity or "token",
                     predictor="random",
                     importance=random_importance(cfg, seed) if case.mode == "static" else thresholds,
                     batch_rule=batch_rule, predictor_dtype=predictor_dtype, head_sparsity=case.head_sparsity,
                     neuron_sparsity=case.neuron_sparsity, kv_rule="skip" if case.mode == "dense" else kv_rule,
                     neuron_input=neuron_input if case.mode == "dejavu" else None,
                     shadowllm_input=shadowllm_input if case.mode == "shadowllm" else None,
                     shadowllm_stages=parse_stages(shadowllm_stages) if case.mode == "shadowllm" else None,
                     neuron_rule=neuron_rule if case.mode in PREDICTOR_MODES else "topk")


def parse_stages(stages) -> tuple[int, ...] | None:
    """ShadowLLM stage starts from ``"1,15"``, a sequence of ints, or None (one predictor)."""
    if stages is None:
        return None
    try:
        return tuple(int(v) for v in (stages.split(",") if isinstance(stages, str) else stages))
    except (TypeError, ValueError):
        raise ValueError(f"shadowllm_stages must be layer indices like '1,15', got {stages!r}") from None


def random_thresholds(model, sparsity: float, seed: int = 0, tokens: int = 256) -> dict:
    """The threshold mode's thresholds for a model with random weights: calibrated (:func:`models.threshold.calibrate`)
    on a dense pass over random tokens, so each input keeps about 1 - ``sparsity`` of its entries, as calibrated
    thresholds do on text."""
    from models.threshold import calibrate

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab, (min(tokens, model.cfg.max_positions),), generator=g).tolist()
    return calibrate(model, [ids], [sparsity])[float(sparsity)]


def _stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"median": statistics.median(s), "p20": percentile(s, 0.2), "p80": percentile(s, 0.8),
            "mean": statistics.fmean(s), "min": s[0], "steps": len(s)}


def _floor_rows(common: dict, step_bytes: int, token_ms: float, copy_gbps: float | None) -> list[dict]:
    """The weight-read floor of a step and how far the measured time is above it."""
    if not copy_gbps:
        return []
    floor = step_bytes / (copy_gbps * 1e9) * 1e3
    return [make_row(**common, metric="floor_ms", value=floor, unit="ms"),
            make_row(**common, metric="floor_ratio", value=token_ms / floor, unit="x")]


def _error_row(base: dict, case: LatencyCase, message: str, **extra) -> dict:
    return make_row(**base, model=case.model, mode=case.mode, sparsity=case.sparsity, policy=case.policy,
                    gen_len=case.gen_len, granularity=case.granularity, metric="error", value=None, unit=None,
                    status="error", error=message, **extra)


def _predictor_ms(mode, model, batch, device) -> float | None:
    """Time of the predictor work of one token (all layers for DejaVu), graph-replayed, cold L2."""
    if not hasattr(mode, "predictor"):
        return None
    x = torch.randn(batch, model.cfg.hidden, device=device, dtype=model.dtype)
    # every site of every layer offered, as a decode step does: each mode predicts where it reads (captured, so the
    # calls that return at once cost nothing)
    fn = lambda: [mode.observe(i, site, x) for i in range(model.cfg.n_layers) for site in mode.observed_sites]
    return time_op(fn, device)["median_us"] / 1e3


def run_mode_case(model, case: LatencyCase, *, prompt_len, batch, copy_gbps, base, seed=0, mode=None,
                  neuron_rule="topk") -> list[dict]:
    """The rows of one case. ``mode``: a mode to time instead of the case's random one (the Pareto sweep times the
    trained predictors and importance files that its quality rows used); ``neuron_rule``: the random predictor
    modes' (:data:`models.plan.NEURON_RULES`)."""
    device = model.device
    given = mode is not None
    if mode is None:
        thresholds = random_thresholds(model, case.sparsity, seed) if case.mode == "threshold" else None
        mode = mode_of(case, model.full_cfg, seed, base["extra"].get("batch_rule", "mean"),
                       base["extra"].get("predictor_dtype", "model"), base["extra"].get("kv_rule", "skip"), thresholds,
                       base["extra"].get("neuron_input", "mlp"), base["extra"].get("shadowllm_input", "residual"),
                       base["extra"].get("shadowllm_stages"), neuron_rule)
    if getattr(mode, "neuron_rule", "topk") == "threshold" and getattr(mode, "neuron_thresholds", None) is None:
        # random predictors: thresholds calibrated on random tokens (rows say so), as the threshold mode's are
        from models.sparse_forward import calibrate_neuron_thresholds

        mode.bind(model)
        if not mode.buffers.dense_neurons:
            g = torch.Generator().manual_seed(seed + 1)
            calibrate_neuron_thresholds(model, mode, [torch.randint(0, model.cfg.vocab, (64,), generator=g).tolist()
                                                      for _ in range(2)])
    ops = get_ops(None, device)
    if not base["extra"].get("norm_fold", True):
        ops = unfused_norms(ops)
    gen = Generator(model, mode, batch=batch, max_len=prompt_len + case.gen_len, backend=ops)
    prompt = torch.randint(0, model.cfg.vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    gen.generate(prompt, case.gen_len)  # compiles, autotunes, captures
    result = gen.generate(prompt, case.gen_len)
    st = _stats(result.token_ms)
    counts = mode.live_counts() or {}  # heads and neurons of a head/neuron plan (the threshold mode counts inputs)
    per_token_pred = mode.granularity == "token"
    weight_bytes = mode.step_weight_bytes()
    predictor_bytes = mode.predictor_bytes()
    step_bytes = weight_bytes + (predictor_bytes if per_token_pred else 0)
    pred_ms = _predictor_ms(mode, model, batch, device)
    desc = mode.describe()
    common = dict(base, model=case.model, mode=case.mode, policy=case.policy, sparsity=case.sparsity,
                  gen_len=case.gen_len, granularity=case.granularity, cuda_graph=result.cuda_graph,
                  predictor=desc.get("predictor"), sparse_hidden=desc.get("sparse_hidden"),
                  pinned=[u["role"] for u in tuned.used()],  # pinned configs used so far (shadow_kernels.tuned)
                  live_heads=sum(counts["heads"]) if "heads" in counts else None,
                  live_neurons=sum(counts["neurons"]) if "neurons" in counts else None, **mode.budgets())
    common["neuron_input"] = desc.get("neuron_input")  # DejaVu's (None for the other modes)
    common["shadowllm_input"] = desc.get("input_site")  # ShadowLLM's (None for the other modes)
    if case.mode == "threshold":
        common["thresholds"] = getattr(mode, "source", None) if given else "calibrated on random tokens"
    if getattr(mode, "neuron_rule", "topk") == "threshold" and not given:
        common["neuron_calibration"] = "random tokens"
    rows = [make_row(**common, metric="token_ms", value=st["median"], unit="ms",
                     **{f"token_ms_{k}": v for k, v in st.items() if k != "median"}),
            make_row(**common, metric="prefill_ms", value=result.prefill_ms, unit="ms"),
            make_row(**common, metric="step_bytes", value=step_bytes, unit="B", weight_bytes=weight_bytes,
                     predictor_bytes=predictor_bytes)]
    rows += _floor_rows(common, step_bytes, st["median"], copy_gbps)
    if pred_ms is not None:
        rows.append(make_row(**common, metric="predictor_ms", value=pred_ms, unit="ms", per_token=per_token_pred))
        share = pred_ms / st["median"] if per_token_pred else 0.0
        rows.append(make_row(**common, metric="predictor_share", value=share, unit="fraction"))
    del gen
    return rows


def run_hf_case(model, case: LatencyCase, *, prompt_len, batch, copy_gbps, base, seed=0) -> list[dict]:
    """Hugging Face ``generate`` (dynamic cache, eager) on the same weights."""
    device = model.device
    hf = model.to_hf()
    prompt = torch.randint(0, model.cfg.vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(device)

    def timed(n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1, use_cache=True)
        if device.type != "cuda":
            import time

            t0 = time.perf_counter()
            hf.generate(prompt, **kw)
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        hf.generate(prompt, **kw)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    with torch.no_grad():
        timed(case.gen_len)
        first = timed(1)
        full = timed(case.gen_len)
    per_token = (full - first) / max(1, case.gen_len - 1)
    step_bytes = model.step_weight_bytes()
    common = dict(base, model=case.model, mode="hf", policy=None, sparsity=0.0, gen_len=case.gen_len,
                  granularity=None, cuda_graph=False, head_sparsity=0.0, neuron_sparsity=0.0, kv_rule="skip",
                  baseline="transformers generate, eager, dynamic cache")
    rows = [make_row(**common, metric="token_ms", value=per_token, unit="ms", how="(t(gen) - t(1)) / (gen - 1)",
                     generate_ms=full, first_token_ms=first),
            make_row(**common, metric="prefill_ms", value=first, unit="ms"),
            make_row(**common, metric="step_bytes", value=step_bytes, unit="B")]
    rows += _floor_rows(common, step_bytes, per_token, copy_gbps)
    return rows


# The settings that make a latency case: a results row with the same values of all of them is that case measured.
# One list for both sides of the resume check (a row's values, and a case's about to run), so they cannot drift apart.
RESUME_FIELDS = ("model", "mode", "sparsity", "policy", "granularity", "gen_len", "head_sparsity", "neuron_sparsity",
                 "batch", "prompt_len", "dtype", "device", "pdl", "batch_rule", "predictor_dtype", "dense_gemv",
                 "norm_fold", "tp", "tp_plan", "kv_rule", "neuron_input", "shadowllm_input", "shadowllm_stages",
                 "threshold_path", "neuron_rule")
THRESHOLD_PATHS = ("fused", "select")
PREDICTOR_MODES = ("dejavu", "shadowllm")


def _resume_key(settings: dict) -> tuple:
    missing = [f for f in RESUME_FIELDS if f not in settings]
    if missing:
        raise KeyError(f"latency resume key lacks {missing}")
    return tuple(settings[f] for f in RESUME_FIELDS)


def _row_settings(r: dict) -> dict:
    """A row's case settings; fields that older rows lack take the value those rows ran with."""
    ex = r.get("extra") or {}
    out = {f: r.get(f) for f in ("model", "mode", "sparsity", "policy", "gen_len", "batch", "prompt_len", "dtype",
                                 "device")}
    out.update(granularity=ex.get("granularity"), head_sparsity=ex.get("head_sparsity", r["sparsity"]),
               neuron_sparsity=ex.get("neuron_sparsity", r["sparsity"]), pdl=ex.get("pdl", False),
               batch_rule=ex.get("batch_rule", "mean"), predictor_dtype=ex.get("predictor_dtype", "model"),
               dense_gemv=ex.get("dense_gemv", "cublas"), norm_fold=ex.get("norm_fold", True), tp=ex.get("tp", 1),
               tp_plan=ex.get("tp_plan"), kv_rule=ex.get("kv_rule", "skip"),
               # DejaVu rows before the MLP-input neuron nets timed the single net on the layer input
               neuron_input=ex.get("neuron_input", "layer") if r.get("mode") == "dejavu" else None,
               # ShadowLLM rows before the residual input timed a predictor on layer 0's attention output
               shadowllm_input=ex.get("shadowllm_input", "attn0") if r.get("mode") == "shadowllm" else None,
               shadowllm_stages=ex.get("shadowllm_stages") if r.get("mode") == "shadowllm" else None,
               # threshold rows before the fused one-token path ran select, then gather
               threshold_path=ex.get("threshold_path", "select") if r.get("mode") == "threshold" else None,
               neuron_rule=ex.get("neuron_rule", "topk") if r.get("mode") in PREDICTOR_MODES else None)
    return out


def _case_settings(c: LatencyCase, run: dict) -> dict:
    """The settings of case ``c`` in a sweep whose shared settings are ``run`` (batch, prompt_len, dtype, device,
    pdl, batch_rule, predictor_dtype, dense_gemv by model, norm_fold, tp, tp_plan, kv_rule, neuron_input,
    shadowllm_input)."""
    # the threshold mode has no head or neuron budget (its rows record None, as its quality rows do)
    h, n = (None, None) if c.mode == "threshold" else c.budgets()
    dense = c.mode in ("dense", "hf")
    return {**{k: v for k, v in run.items() if k != "dense_gemv"}, "model": c.model, "mode": c.mode,
            "sparsity": c.sparsity, "policy": c.policy, "granularity": c.granularity, "gen_len": c.gen_len,
            "head_sparsity": h, "neuron_sparsity": n, "dense_gemv": run["dense_gemv"][c.model],
            "kv_rule": "skip" if dense else run["kv_rule"],
            "neuron_input": run["neuron_input"] if c.mode == "dejavu" else None,
            "shadowllm_input": run["shadowllm_input"] if c.mode == "shadowllm" else None,
            "shadowllm_stages": run["shadowllm_stages"] if c.mode == "shadowllm" else None,
            "threshold_path": run["threshold_path"] if c.mode == "threshold" else None,
            "neuron_rule": run["neuron_rule"] if c.mode in PREDICTOR_MODES else None}


def _done_keys(rows) -> set:
    return {_resume_key(_row_settings(r)) for r in rows
            if r.get("kind") == "latency" and r.get("status") in ("ok", "skipped")}


def build_model(name: str, dtype, device, seed=0, tp=None):
    """A registry shape (tiny ones included) with random weights; with ``tp``, this rank's shard of it, made at its
    size (:func:`models.tp.random_shard`)."""
    cfg = DecoderConfig.from_spec(name)
    if tp is not None:
        from models.tp import random_shard

        return random_shard(cfg, tp, dtype=dtype, device=device, seed=seed)
    return random_model(cfg, dtype=dtype, device=device, seed=seed)


def run_latency(models, modes, sparsities, gens, granularities, *, prompt_len=128, batch=1, dtype_name="fp16",
                out_path="runs/latency.jsonl", shadowllm_policies=("global", "local"), progress=True,
                batch_rule="mean", predictor_dtype="model", dense_gemv="auto", norm_fold=True,
                head_sparsity=None, neuron_sparsity=None, tp=None, kv_rule="skip",
                neuron_input="mlp", shadowllm_input="residual", shadowllm_stages=None,
                threshold_path="fused", neuron_rule="topk") -> list[dict]:
    """Rows of every case not already in ``out_path``. ``batch_rule``: how a batch > 1 shares one plan in
    the predictor modes (``mean`` or ``union`` of the sequences' selections, see models.plan).
    ``predictor_dtype``: ``model`` or ``fp8`` (the predictors' second layer in float8, see models.modes).
    ``dense_gemv``: ``cublas``, ``triton`` or ``auto`` (the default: :func:`resolve_dense_gemv`), what dense layers
    run their projections with (``OPTDecoder.set_dense_gemv``, ``LlamaDecoder.set_dense_gemv``; rows record the engine
    used). ``norm_fold=False``: pre-norm layers run each norm as its
    own kernel before the GEMV (``models.ops.unfused_norms``), to measure the fold against it. ``tp``: this
    rank's :class:`models.tp.TensorParallel` (every rank runs the sweep, rank 0 writes; rows say the world size and
    plan rule; a failing case stops the group instead of becoming an error row, since the other ranks could not
    know of it). ``kv_rule``: what the sparse modes' skipped heads leave in the cache (``always``: grouped-query
    models only, every group's key and value rows read and cached each step). ``neuron_input``: what DejaVu's random
    predictor scores neurons from (``mlp``: a second net per layer on the MLP input; ``layer``).
    ``shadowllm_input``: what ShadowLLM's random predictor reads (``residual``: the stream entering layer 1, one more
    residual add materialised per step, as `train` makes them; ``attn0``: layer 0's attention output).
    ``shadowllm_stages``: a staged random ShadowLLM predictor's stage starts (``"1,15"``; local top-k only; rows
    record them). ``threshold_path``: how the threshold mode's projections run at batch 1 (``fused``: each GEMV
    program thresholds its own chunk of the input; ``select``: one program makes an index list, then the
    gather-cols GEMV; :mod:`shadow_kernels.threshold`); its rows record it. ``neuron_rule``: how DejaVu and
    ShadowLLM choose neurons (``threshold``: each layer's above a threshold calibrated on random tokens, local
    policy; :mod:`models.plan`); their rows record it."""
    from shadow_kernels.threshold import set_fused

    if threshold_path not in THRESHOLD_PATHS:
        raise ValueError(f"threshold_path must be one of {THRESHOLD_PATHS}, got {threshold_path!r}")
    prev = set_fused(threshold_path == "fused")
    try:
        return _run_latency(models, modes, sparsities, gens, granularities, prompt_len=prompt_len, batch=batch,
                            dtype_name=dtype_name, out_path=out_path, shadowllm_policies=shadowllm_policies,
                            progress=progress, batch_rule=batch_rule, predictor_dtype=predictor_dtype,
                            dense_gemv=dense_gemv, norm_fold=norm_fold, head_sparsity=head_sparsity,
                            neuron_sparsity=neuron_sparsity, tp=tp, kv_rule=kv_rule, neuron_input=neuron_input,
                            shadowllm_input=shadowllm_input, shadowllm_stages=shadowllm_stages,
                            threshold_path=threshold_path, neuron_rule=neuron_rule)
    finally:
        set_fused(prev)


def _run_latency(models, modes, sparsities, gens, granularities, *, prompt_len, batch, dtype_name, out_path,
                 shadowllm_policies, progress, batch_rule, predictor_dtype, dense_gemv, norm_fold, head_sparsity,
                 neuron_sparsity, tp, kv_rule, neuron_input, shadowllm_input, shadowllm_stages,
                 threshold_path, neuron_rule) -> list[dict]:
    from tqdm import tqdm

    from models.plan import check_batch_rule
    from models.predictors import NEURON_INPUTS, SHADOWLLM_INPUTS

    check_batch_rule(batch_rule)
    if neuron_input not in NEURON_INPUTS:
        raise ValueError(f"neuron_input must be one of {NEURON_INPUTS}, got {neuron_input!r}")
    if shadowllm_input not in SHADOWLLM_INPUTS:
        raise ValueError(f"shadowllm_input must be one of {SHADOWLLM_INPUTS}, got {shadowllm_input!r}")
    if dense_gemv not in DENSE_GEMVS:
        raise ValueError(f"dense_gemv must be one of {DENSE_GEMVS}, got {dense_gemv!r}")
    bad = [m for m in modes if m not in LATENCY_MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; known: {', '.join(LATENCY_MODES)}")
    from shadow_kernels import decode_attention, gather_cols
    from shadow_kernels.pdl import pdl_enabled

    dtype = DTYPES[dtype_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    writer = row_writer(out_path, tp)
    env = environment(device)
    bw = copy_bandwidth(device)
    pdl = pdl_enabled(device)  # programmatic dependent launch of our kernels (shadow_kernels.pdl)
    base = dict(kind="latency", device=env["device"], dtype=dtype_name, batch=batch, prompt_len=prompt_len,
                git_commit=git_commit(), weights="random",
                extra={"torch": env["torch"], "triton": env["triton"], "copy_gbps": bw["copy_gbps"], "pdl": pdl,
                       "batch_rule": batch_rule, "predictor_dtype": predictor_dtype,
                       "norm_fold": bool(norm_fold), "cols": gather_cols.settings(),
                       "attn": decode_attention.settings()})
    if tp is not None:
        base["extra"].update(tp=tp.world, tp_plan=tp.plan)
    if kv_rule != "skip":
        base["extra"]["kv_rule"] = kv_rule
    base["extra"]["neuron_input"] = neuron_input  # DejaVu's (its rows keep it; mode_of builds the predictor with it)
    base["extra"]["shadowllm_input"] = shadowllm_input  # ShadowLLM's, likewise
    if shadowllm_stages is not None:  # a staged ShadowLLM's stage starts, "1,15" (absent: one predictor)
        shadowllm_stages = ",".join(str(v) for v in parse_stages(shadowllm_stages))
        base["extra"]["shadowllm_stages"] = shadowllm_stages
    base["extra"]["threshold_path"] = threshold_path  # the threshold mode's (its rows keep it)
    if neuron_rule not in NEURON_RULES:
        raise ValueError(f"neuron_rule must be one of {NEURON_RULES}, got {neuron_rule!r}")
    engines = {m: resolve_dense_gemv(dense_gemv, m, dtype, device, 1 if tp is None else tp.world) for m in models}
    done = _done_keys(writer.resume())
    run = dict(batch=batch, prompt_len=prompt_len, dtype=dtype_name, device=env["device"], pdl=pdl,
               batch_rule=batch_rule, predictor_dtype=predictor_dtype, dense_gemv=engines, norm_fold=bool(norm_fold),
               tp=1 if tp is None else tp.world, tp_plan=None if tp is None else tp.plan, kv_rule=kv_rule,
               neuron_input=neuron_input, shadowllm_input=shadowllm_input, shadowllm_stages=shadowllm_stages,
               threshold_path=threshold_path, neuron_rule=neuron_rule)
    todo = [c for c in latency_cases(models, modes, sparsities, gens, granularities, shadowllm_policies,
                                     head_sparsity, neuron_sparsity)
            if _resume_key(_case_settings(c, run)) not in done]
    new_rows: list[dict] = []
    by_model: dict[str, list[LatencyCase]] = {}
    for c in todo:
        by_model.setdefault(c.model, []).append(c)
    bar = tqdm(total=len(todo), desc="latency", disable=not progress or (tp is not None and tp.rank > 0))
    for name, cases in by_model.items():
        engine = engines[name]
        mbase = dict(base, extra={**base["extra"], "dense_gemv": engine})
        try:
            model = build_model(name, dtype, device, tp=tp)
            if engine != "cublas":
                if not hasattr(model, "set_dense_gemv"):
                    raise ValueError(f"dense_gemv {engine!r} is built for OPT and Llama models; {name} is "
                                     f"{model.cfg.family}")
                model.set_dense_gemv(engine)
        except Exception as err:  # e.g. out of memory: record every case of this model as failed
            if tp is not None:
                raise
            rows = [_error_row(mbase, c, f"building the model: {type(err).__name__}: {err}") for c in cases]
            writer.write(rows)
            new_rows += rows
            bar.update(len(cases))
            continue
        for case in cases:
            run = run_hf_case if case.mode == "hf" else run_mode_case
            try:
                kw = {} if case.mode == "hf" else {"neuron_rule": neuron_rule}
                rows = run(model, case, prompt_len=prompt_len, batch=batch, copy_gbps=bw["copy_gbps"], base=mbase,
                           **kw)
            except Exception as err:  # one failing case must not lose the sweep
                if tp is not None:
                    raise
                rows = [_error_row(mbase, case, f"{type(err).__name__}: {err}",
                                   traceback=traceback.format_exc(limit=4))]
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            writer.write(rows)
            new_rows += rows
            bar.update(1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return new_rows


def summary_table(rows: list[dict]) -> str:
    """Per model and generation length: each case's ms/token, the floor, and the speedup over dense (with
    programmatic dependent launch, "+pdl", against dense with it)."""
    cases: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") != "latency" or r.get("status") != "ok":
            continue
        model = (r["model"] + ("+pdl" if r["extra"].get("pdl") else "")
                 + ("+fp8pred" if r["extra"].get("predictor_dtype") == "fp8" else "")
                 + ("+owngemv" if r["extra"].get("dense_gemv") == "triton" else "")
                 + ("+unfusednorm" if not r["extra"].get("norm_fold", True) else ""))
        key = (model, r["gen_len"], r["mode"], r["sparsity"], r["policy"], r["extra"].get("granularity"))
        cases.setdefault(key, {})[r["metric"]] = r["value"]
    dense = {(k[0], k[1]): v["token_ms"] for k, v in cases.items() if k[2] == "dense" and "token_ms" in v}
    lines = [f"{'model':<20} {'gen':>4} {'mode':<10} {'s':>4} {'policy':<7} {'granul.':<7} {'ms/tok':>8} "
             f"{'floor':>7} {'x floor':>7} {'vs dense':>8} {'pred share':>10}"]
    for key in sorted(cases, key=lambda k: (k[0], k[1], LATENCY_MODES.index(k[2]), k[3], str(k[4]), str(k[5]))):
        v = cases[key]
        if "token_ms" not in v:
            continue
        d = dense.get((key[0], key[1]))
        fmt = lambda x, f: format(x, f) if x is not None else "-"
        lines.append(f"{key[0]:<20} {key[1]:>4} {key[2]:<10} {key[3]:>4.2f} {str(key[4] or '-'):<7} "
                     f"{str(key[5] or '-'):<7} {v['token_ms']:>8.3f} {fmt(v.get('floor_ms'), '>7.3f')} "
                     f"{fmt(v.get('floor_ratio'), '>7.2f')} {fmt(d / v['token_ms'] if d else None, '>8.2f')} "
                     f"{fmt(v.get('predictor_share'), '>10.3f')}")
    return "\n".join(lines)
