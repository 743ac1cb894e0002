"""Kernel benchmark: every shadow_kernels op on the layer shapes of real models, against cuBLAS dense
and against torch ``index_select`` + matmul, with the bytes each must move and the fraction of the
measured copy bandwidth it reaches.

Each case is checked against an fp32 reference before it is timed; a case that fails (wrong result,
out of memory, compile error) becomes an error row and the sweep goes on.
"""

from __future__ import annotations

import math
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import shadow_kernels as sk
from models.registry import ModelSpec, get_spec
from shadow_kernels import tuned

from .results import RowWriter, environment, git_commit, make_row
from .timing import copy_bandwidth, host_cost, time_cold_graph, time_eager, time_steady, time_stream

GEMV_OPS = ("fc1", "fc2", "qkv", "out_proj")
LLAMA_OPS = ("swiglu",)  # fused gate+up gather GEMV (Llama models only)
PREDICTOR_OPS = ("predictor_dejavu", "predictor_shadowllm")
TOPK_OPS = ("topk_local", "topk_global")
# the threshold mode's down projection (fc2): inputs below a threshold dropped, only the kept rows read
THRESHOLD_OPS = ("threshold_fc2",)
OPS = GEMV_OPS + LLAMA_OPS + PREDICTOR_OPS + TOPK_OPS + THRESHOLD_OPS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative error (||out - ref|| / ||ref|| against fp32) above which a case is reported as wrong.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}

# Hidden widths: DejaVu's per-layer predictors are low-rank MLPs (about 1k); ShadowLLM's single
# predictor has one hidden layer of 2048 (paper, appendix A.1).
DEJAVU_HIDDEN = 1024
SHADOWLLM_HIDDEN = 2048
# ShadowLLM's output layer covers every later head and neuron; above this many bytes it is skipped.
MAX_PREDICTOR_BYTES = 6 << 30

# The CPU default of the sweep: a registry shape small enough for the Triton interpreter.
TINY = "tiny"


class SkipCase(Exception):
    """A case this machine or configuration does not run (recorded as a skipped row)."""


@dataclass(frozen=True)
class Case:
    model: str
    op: str
    sparsity: float
    batch: int


@dataclass
class Built:
    """What a case needs: callables per variant, the fp32 reference, bytes moved, shapes."""

    variants: dict[str, Callable[[], torch.Tensor]]
    reference: Callable[[], torch.Tensor]
    checked: tuple[str, ...]  # variants compared with the reference
    bytes_moved: int  # fewest bytes the sparse op must read and write
    dense_bytes: int
    shape: dict = field(default_factory=dict)
    # Variants whose output must equal the reference exactly (top-k selections), as 0/1 masks.
    exact: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    # Variants with their own reference (other weights: fp8) and their own byte count.
    own_reference: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    own_bytes: dict[str, int] = field(default_factory=dict)
    # The case's tensors by name, for probes that time other ways of doing the same work (benchmarks/).
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def kept(n: int, sparsity: float) -> int:
    """Units kept at a sparsity: the fraction (1 - s) of n, rounded, at least one."""
    return max(1, min(n, round(n * (1.0 - sparsity))))


def _rand(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _choice(n, k, device, gen):
    return torch.randperm(n, generator=gen, device=device)[:k].sort().values


def _vec(t, batch):
    """One token runs through the 1-D path, a batch through the 2-D path."""
    return t[0] if batch == 1 else t


def _rows_case(w, b, x, idx, relu, batch, dense_rows):
    act = torch.relu if relu else (lambda t: t)
    idx32 = idx.to(torch.int32)
    variants = {
        "triton": lambda: sk.gather_rows_gemv(w, x, idx32, b, "relu" if relu else None, validate=False),
        "torch_dense": lambda: act(F.linear(x, w, b)),
        "torch_index_select": lambda: act(F.linear(x, w.index_select(0, idx), b.index_select(0, idx))),
    }
    reference = lambda: act(x.float() @ w.index_select(0, idx).float().T + b.index_select(0, idx).float())
    k, K = idx.numel(), w.shape[1]
    elt = w.element_size()
    moved = (k * K + batch * K + k + batch * k) * elt + 4 * k
    dense = (dense_rows * K + batch * K + dense_rows + batch * dense_rows) * elt
    return Built(variants, reference, ("triton", "torch_index_select"), moved, dense,
                 {"weight": list(w.shape), "selected": k}, tensors={"weight": w, "bias": b, "x": x, "idx": idx})


def _cols_case(wt, w_natural, b, h, h_dense, idx, batch):
    idx32 = idx.to(torch.int32)
    h2 = h if h.dim() == 2 else h[None]
    variants = {
        "triton": lambda: sk.gather_cols_gemv(wt, h, idx32, b, validate=False),
        "triton_atomic": lambda: sk.gather_cols_gemv(wt, h, idx32, b, deterministic=False, validate=False),
        "torch_dense": lambda: F.linear(h_dense, w_natural, b),
        "torch_index_select": lambda: torch.addmm(b, h2, wt.index_select(0, idx)),
    }
    reference = lambda: h.float() @ wt.index_select(0, idx).float() + b.float()
    k, M = idx.numel(), wt.shape[1]
    N = wt.shape[0]
    elt = wt.element_size()
    moved = (k * M + batch * k + M + batch * M) * elt + 4 * k
    dense = (N * M + batch * N + M + batch * M) * elt
    checked = ("triton", "triton_atomic", "torch_index_select")
    return Built(variants, reference, checked, moved, dense, {"weight_t": list(wt.shape), "selected": k},
                 tensors={"weight_t": wt, "bias": b, "h": h, "idx": idx})


def _swiglu_case(spec, sparsity, batch, dtype, device, gen):
    if spec.family != "llama":
        raise SkipCase(f"swiglu is the Llama MLP; {spec.name} is {spec.family}")
    E, Fn = spec.hidden, spec.ffn
    gate = _rand((Fn, E), dtype, device, gen, E**-0.5)
    up = _rand((Fn, E), dtype, device, gen, E**-0.5)
    x = _vec(_rand((batch, E), dtype, device, gen), batch)
    idx = _choice(Fn, kept(Fn, sparsity), device, gen)
    idx32 = idx.to(torch.int32)
    variants = {
        "triton": lambda: sk.gather_swiglu_gemv(gate, up, x, idx32, validate=False),
        "torch_dense": lambda: F.silu(F.linear(x, gate)) * F.linear(x, up),
        "torch_index_select": lambda: (F.silu(F.linear(x, gate.index_select(0, idx)))
                                       * F.linear(x, up.index_select(0, idx))),
    }
    reference = lambda: sk.gather_swiglu_gemv_ref(gate.float(), up.float(), x.float(), idx)
    k, elt = idx.numel(), gate.element_size()
    moved = (2 * k * E + batch * E + batch * k) * elt + 4 * k
    dense = (2 * Fn * E + batch * E + batch * Fn) * elt
    return Built(variants, reference, ("triton", "torch_index_select"), moved, dense,
                 {"weight": [2, Fn, E], "selected": k})


def _predictor_case(spec, op, batch, dtype, device, gen):
    E = spec.hidden
    if op == "predictor_dejavu":
        hidden, outputs = DEJAVU_HIDDEN, spec.n_heads + spec.ffn
    else:
        hidden, outputs = SHADOWLLM_HIDDEN, (spec.n_layers - 1) * (spec.n_heads + spec.ffn)
    elt = torch.tensor([], dtype=dtype).element_size()
    if outputs * hidden * elt > MAX_PREDICTOR_BYTES:
        raise SkipCase(f"{op} for {spec.name} needs {outputs * hidden * elt / 2**30:.1f} GiB of weights; "
                          f"skipped above {MAX_PREDICTOR_BYTES / 2**30:.0f} GiB")
    w1 = _rand((hidden, E), dtype, device, gen, E**-0.5)
    b1 = _rand((hidden,), dtype, device, gen, 0.1)
    w2 = _rand((outputs, hidden), dtype, device, gen, hidden**-0.5)
    b2 = _rand((outputs,), dtype, device, gen, 0.1)
    x = _vec(_rand((batch, E), dtype, device, gen), batch)
    q, scale = sk.quantize_rows_fp8(w2) if device.type == "cuda" else (None, None)
    variants = {
        "triton": lambda: sk.fused_predictor(x, w1, b1, w2, b2),
        "torch_unfused": lambda: F.linear(F.linear(x, w1, b1).relu_(), w2, b2).float(),
    }
    moved = (hidden * E + hidden + outputs * hidden + outputs + batch * E) * elt + 4 * batch * outputs
    built = Built(variants, lambda: sk.fused_predictor_ref(x, w1, b1, w2, b2), tuple(variants), moved, moved,
                  {"w1": [hidden, E], "w2": [outputs, hidden]})
    if q is not None:  # fp8 second layer (the interpreter has no fp8 loads)
        variants["triton_fp8"] = lambda: sk.fused_predictor(x, w1, b1, q, b2, w2_scale=scale)
        built.checked += ("triton_fp8",)
        built.own_reference["triton_fp8"] = lambda: sk.fused_predictor_ref(x, w1, b1, q, b2, w2_scale=scale)
        built.own_bytes["triton_fp8"] = moved - outputs * hidden * elt + outputs * hidden + 4 * outputs
    return built


def _topk_case(spec, op, sparsity, device, gen):
    # Neuron scores of every layer after the first (what the ShadowLLM predictor emits).
    L, n = spec.n_layers - 1, spec.ffn
    scores = torch.randn((L, n), generator=gen, device=device)
    policy = op.removeprefix("topk_")
    k = kept(n, sparsity) if policy == "local" else kept(L * n, sparsity)

    def as_mask(fn):
        def run():
            sel = fn(scores, k, policy, validate=False)
            live = torch.arange(sel.idx.shape[1], device=device)[None, :] < sel.count[:, None].long()
            mask = torch.zeros((L, n), dtype=torch.float32, device=device)
            # scatter_add: padded slots hold index 0 and add nothing, whatever order they land in
            return mask.scatter_add_(1, sel.idx.long(), live.float())
        return run

    variants = {"triton": as_mask(sk.topk_indices), "torch_reference": as_mask(sk.topk_indices_ref)}
    timed = {"triton": lambda: sk.topk_indices(scores, k, policy, validate=False),
             "torch_reference": lambda: sk.topk_indices_ref(scores, k, policy, validate=False)}
    reference = lambda: sk.topk_mask(scores, k, dim=-1 if policy == "local" else None).float()
    return Built(timed, reference, (), scores.numel() * 4, scores.numel() * 4, {"scores": [L, n], "k": k},
                 exact=variants)


def _threshold_case(spec, sparsity, batch, dtype, device, gen):
    """fc2 / down of the threshold mode: the threshold is the s-quantile of the inputs' largest magnitude over the
    batch, so about a fraction s of the inputs is dropped."""
    n_in, M = spec.ffn, spec.hidden
    wt = _rand((n_in, M), dtype, device, gen, n_in**-0.5)
    w_natural = wt.T.contiguous()
    a2 = _rand((batch, n_in), dtype, device, gen)
    t = torch.quantile(a2.abs().amax(dim=0).float(), sparsity).to(dtype).reshape(1)
    a = _vec(a2, batch)

    def composed():  # the threshold mode's projection before the one-launch select
        keep = (a2.abs() > t).any(dim=0, keepdim=True)
        sel = sk.mask_to_indices(keep, n_in, validate=False)
        idx = sel.idx[0]
        y = sk.gather_cols_gemv(wt, a2.index_select(1, idx.long()), idx, count=sel.count, validate=False)
        return y if batch > 1 else y[0]

    def select_gather():  # two launches, the path of a batch: one program selects, then the gather-cols GEMV
        h, idx, count = sk.threshold_select(a2, t)
        y = sk.gather_cols_gemv(wt, h, idx, count=count, validate=False)
        return y if batch > 1 else y[0]

    variants = {
        "triton": lambda: sk.threshold_cols_gemv(wt, a, t, validate=False)[0],  # one token: the fused path
        "triton_select_gather": select_gather,
        "triton_composed": composed,
        "torch_dense": lambda: F.linear(a, w_natural),
    }
    keep = (a2.abs() > t).any(dim=0)
    reference = lambda: _vec((a2.float() * keep.float()) @ wt.float(), batch)
    k, elt = int(keep.sum()), wt.element_size()
    moved = (k * M + batch * n_in + batch * M) * elt + 4 * k
    dense = (n_in * M + batch * n_in + batch * M) * elt
    return Built(variants, reference, ("triton", "triton_select_gather", "triton_composed"), moved, dense,
                 {"weight_t": [n_in, M], "selected": k}, tensors={"weight_t": wt, "a": a, "threshold": t})


def build_case(spec: ModelSpec, case: Case, dtype, device, gen) -> Built:
    E, H, d, Fn, B = spec.hidden, spec.n_heads, spec.head_dim, spec.ffn, case.batch
    if case.op == "fc1":
        w = _rand((Fn, E), dtype, device, gen, E**-0.5)
        b = _rand((Fn,), dtype, device, gen, 0.1)
        x = _vec(_rand((B, E), dtype, device, gen), B)
        return _rows_case(w, b, x, _choice(Fn, kept(Fn, case.sparsity), device, gen), True, B, Fn)
    if case.op == "qkv":
        w = _rand((3 * E, E), dtype, device, gen, E**-0.5)
        b = _rand((3 * E,), dtype, device, gen, 0.1)
        x = _vec(_rand((B, E), dtype, device, gen), B)
        heads = _choice(H, kept(H, case.sparsity), device, gen)
        per_head = (heads[:, None] * d + torch.arange(d, device=device)[None, :]).reshape(-1)
        idx = torch.cat([part * E + per_head for part in range(3)])
        return _rows_case(w, b, x, idx, False, B, 3 * E)
    if case.op in ("fc2", "out_proj"):
        n_in = Fn if case.op == "fc2" else E
        wt = _rand((n_in, E), dtype, device, gen, n_in**-0.5)
        w_natural = wt.T.contiguous()
        b = _rand((E,), dtype, device, gen, 0.1)
        if case.op == "fc2":
            idx = _choice(Fn, kept(Fn, case.sparsity), device, gen)
        else:
            heads = _choice(H, kept(H, case.sparsity), device, gen)
            idx = (heads[:, None] * d + torch.arange(d, device=device)[None, :]).reshape(-1)
        h = _vec(_rand((B, idx.numel()), dtype, device, gen).relu(), B)
        h_dense = _vec(_rand((B, n_in), dtype, device, gen).relu(), B)
        built = _cols_case(wt, w_natural, b, h, h_dense, idx, B)
        if case.op == "out_proj":  # the decoder's out_proj reads whole heads of the natural layout
            idx32 = idx.to(torch.int32)
            built.variants["triton_cols"] = built.variants["triton"]
            built.variants["triton"] = lambda: sk.gather_segments_gemv(w_natural, h, idx32, b, segment=d,
                                                                       validate=False)
            built.checked = built.checked + ("triton_cols",)
            built.tensors["weight"] = w_natural
        return built
    if case.op == "swiglu":
        return _swiglu_case(spec, case.sparsity, B, dtype, device, gen)
    if case.op in PREDICTOR_OPS:
        return _predictor_case(spec, case.op, B, dtype, device, gen)
    if case.op in TOPK_OPS:
        return _topk_case(spec, case.op, case.sparsity, device, gen)
    if case.op in THRESHOLD_OPS:
        return _threshold_case(spec, case.sparsity, B, dtype, device, gen)
    raise ValueError(f"unknown op {case.op!r}; known ops: {', '.join(OPS)}")


# The steady and stream timers (bench.timing) run each variant on enough copies of a case's data that
# one replay reads at least this many bytes (five times the H100's L2), between MIN and MAX copies.
STREAM_BYTES = 256 << 20
MIN_COPIES, MAX_COPIES = 4, 256
TIMERS = ("steady", "stream", "single", "eager", "cold", "host")
SINGLE_CALL_TIMERS = ("single", "eager", "cold", "host")  # one copy of the data, one call at a time


def n_copies(bytes_moved: int, timer: str) -> int:
    if timer in SINGLE_CALL_TIMERS:
        return 1
    return max(MIN_COPIES, min(MAX_COPIES, -(-STREAM_BYTES // max(1, bytes_moved))))


def _timed_with_configs(fns, device, timer: str = "steady") -> dict:
    """Time the calls ``fns`` (one per data copy) and record which autotuned config each kernel ran with."""
    tuners = tuned.autotuners()
    for tuner in tuners.values():
        tuner.best_config = None
    if timer == "steady":
        t = time_steady(fns, device)
    elif timer in ("eager", "cold", "host"):
        t = {"eager": time_eager, "cold": time_cold_graph, "host": host_cost}[timer](fns[0], device)
    else:
        t = time_stream(fns, device)
    t["configs"] = {name: str(tuner.best_config) for name, tuner in tuners.items()
                    if getattr(tuner, "best_config", None) is not None}
    return t


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def cases(models, ops, sparsities, batches) -> list[Case]:
    out = []
    for model in models:
        for op in ops:
            if op in PREDICTOR_OPS:
                out += [Case(model, op, 0.0, b) for b in batches]
            elif op in TOPK_OPS:
                out += [Case(model, op, s, 1) for s in sparsities if s > 0]
            else:
                out += [Case(model, op, s, b) for s in sparsities for b in batches]
    return out


def _spec(name: str) -> ModelSpec:
    return get_spec(name)


def run_case(case: Case, dtype, device, copy_gbps, base: dict, timer: str = "steady") -> list[dict]:
    """Check and time every variant of one case; returns its rows.

    The first copy of the data is checked against the reference; with the steady and stream timers, further copies
    (other weights, inputs and index sets of the same shapes) are built for timing only.
    """
    spec = _spec(case.model)
    seed = zlib.crc32(f"{case.model}/{case.op}/{case.sparsity}/{case.batch}".encode())
    gen = torch.Generator(device=device).manual_seed(seed)
    built = build_case(spec, case, dtype, device, gen)
    ref = built.reference()
    errors = {name: float((fn() != ref).sum()) for name, fn in built.exact.items()}
    for name in built.checked:
        own = built.own_reference.get(name)
        errors[name] = rel_err(built.variants[name](), own() if own else ref)
    del ref
    tol = 0.0 if built.exact else TOLERANCE[dtype]
    copies = [built] + [build_case(spec, case, dtype, device, gen)
                        for _ in range(n_copies(built.bytes_moved, timer) - 1)]
    timings = {name: _timed_with_configs([c.variants[name] for c in copies], device, timer) for name in built.variants}
    del copies
    dense_us = timings.get("torch_dense", timings.get("torch_unfused", timings.get("torch_reference")))["median_us"]
    rows = []
    for name, t in timings.items():
        us = t["median_us"]
        nbytes = built.own_bytes.get(name, built.dense_bytes if name == "torch_dense" else built.bytes_moved)
        gbps = nbytes / (us * 1e-6) / 1e9
        err = errors.get(name)
        status = "ok" if err is None or err <= tol else "wrong"
        common = dict(base, model=case.model, sparsity=case.sparsity, batch=case.batch, status=status, op=case.op,
                      variant=name, bytes=nbytes, p20_us=t["p20_us"], p80_us=t["p80_us"], timer=t["timer"],
                      reps=t["reps"], calls_per_replay=t.get("calls_per_replay", 1), kernel_configs=t["configs"],
                      **built.shape)
        metrics = [("time_us", us, "us"), ("achieved_gbps", gbps, "GB/s"), ("speedup_vs_dense", dense_us / us, "x")]
        if copy_gbps:
            metrics.append(("pct_of_copy_bw", 100.0 * gbps / copy_gbps, "%"))
            metrics.append(("floor_us", nbytes / (copy_gbps * 1e9) * 1e6, "us"))
        if err is not None:
            metrics.append(("mismatched_units" if built.exact else "rel_err", err, ""))
        rows += [make_row(**common, metric=m, value=v, unit=u) for m, v, u in metrics]
    return rows


def _timer_of(row) -> str:
    # rows without timer_kind were timed one call per replay
    return row["extra"].get("timer_kind", "single")


def _done_keys(rows) -> set:
    return {(r["model"], r["extra"].get("op"), r["sparsity"], r["batch"], r["dtype"], r["device"], _timer_of(r))
            for r in rows if r.get("kind") == "kernel" and r.get("status") in ("ok", "wrong", "skipped")}


def run_sweep(models, ops, sparsities, batches, dtype_name, out_path, *, progress=True, timer="steady") -> list[dict]:
    """Run every case not already in ``out_path``; returns the rows written by this call.

    timer: ``steady`` (default; :func:`bench.timing.time_steady`: the copies of the data run once over and
    twice over in two graphs, per call = the difference over the copies), ``stream`` (
    :func:`bench.timing.time_stream`: one replay over the copies, divided by them) or ``single`` (one call per
    graph replay after an L2 flush).
    """
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
    from tqdm import tqdm

    dtype = DTYPES[dtype_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    writer = RowWriter(out_path)
    env = environment(device, interpreted=True)
    done = _done_keys(writer.resume())
    todo = [c for c in cases(models, ops, sparsities, batches)
            if (c.model, c.op, c.sparsity, c.batch, dtype_name, env["device"], timer) not in done]
    if not todo:  # resumed with nothing left: no copy measured, no row written
        return []
    bw = copy_bandwidth(device)
    base = dict(kind="kernel", device=env["device"], dtype=dtype_name, git_commit=git_commit(),
                extra={"torch": env["torch"], "triton": env["triton"], "copy_gbps": bw["copy_gbps"],
                       "timer_kind": timer})
    copy_detail = {k: v for k, v in bw.items() if k != "copy_gbps"}
    new_rows: list[dict] = []
    if bw["copy_gbps"]:
        env_row = make_row(**base, metric="copy_bandwidth", value=bw["copy_gbps"], unit="GB/s", op="copy",
                           variant="torch_copy", **copy_detail, **{k: v for k, v in env.items() if k != "device"})
        writer.write([env_row])
        new_rows.append(env_row)
    for case in tqdm(todo, desc="kernels", disable=not progress):
        try:
            rows = run_case(case, dtype, device, bw["copy_gbps"], base, timer)
        except SkipCase as why:
            rows = [make_row(**base, model=case.model, sparsity=case.sparsity, batch=case.batch, op=case.op,
                             metric="skipped", value=None, unit=None, status="skipped", error=str(why))]
        except Exception as err:  # one failing shape must not lose the sweep
            rows = [make_row(**base, model=case.model, sparsity=case.sparsity, batch=case.batch, op=case.op,
                             metric="error", value=None, unit=None, status="error",
                             error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=3))]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        writer.write(rows)
        new_rows += rows
    return new_rows


def summary_table(rows: list[dict]) -> str:
    """One line per case: time of each variant, our % of copy bandwidth and speedup over dense."""
    by_case: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") != "kernel" or r["extra"].get("op") == "copy":
            continue
        key = (r["model"], r["extra"].get("op"), r["sparsity"], r["batch"])
        entry = by_case.setdefault(key, {})
        if r["status"] in ("error", "skipped"):
            entry["error"] = f"{r['status'].upper()} {r['extra'].get('error', '')}"
            continue
        var = r["extra"]["variant"]
        entry[(var, r["metric"])] = r["value"]
        if r["status"] == "wrong":
            entry.setdefault("wrong", set()).add(var)
    lines = [f"{'model':<10} {'op':<19} {'s':>4} {'B':>2} {'ours us':>9} {'dense us':>9} {'idxsel us':>9} "
             f"{'atomic us':>9} {'cols us':>8} {'%copyBW':>8} {'vs dense':>8} {'fp8 us':>8}"]
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
    for (model, op, s, b), e in by_case.items():
        if "error" in e:
            lines.append(f"{model:<10} {op:<19} {s:>4} {b:>2}  {e['error'][:80]}")
            continue
        dense = e.get(("torch_dense", "time_us"), e.get(("torch_unfused", "time_us"),
                                                        e.get(("torch_reference", "time_us"))))
        lines.append(
            f"{model:<10} {op:<19} {s:>4} {b:>2} {fmt(e.get(('triton', 'time_us')), '9.1f')} {fmt(dense, '9.1f')} "
            f"{fmt(e.get(('torch_index_select', 'time_us')), '9.1f')} "
            f"{fmt(e.get(('triton_atomic', 'time_us')), '9.1f')} "
            f"{fmt(e.get(('triton_cols', 'time_us')), '8.1f')} "
            f"{fmt(e.get(('triton', 'pct_of_copy_bw')), '8.1f')} {fmt(e.get(('triton', 'speedup_vs_dense')), '8.2f')} "
            f"{fmt(e.get(('triton_fp8', 'time_us')), '8.1f')}"
            + (f"  WRONG: {', '.join(sorted(e['wrong']))}" if "wrong" in e else "")
        )
    return "\n".join(lines)
