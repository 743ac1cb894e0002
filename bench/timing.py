"""GPU timing: every kernel figure is the median of many replays of a captured CUDA graph, each
with a cold L2.

Why a graph: a decode step runs as one captured graph, so launch overhead is not part of it. Timing
eager calls instead measured the Python launch path of each op (notes/kernels.md: every op
took 60-200 us whatever its size). Why a cold L2: decode reads every weight once per token; a 256 MB
write between replays evicts the 50 MB L2 of an H100.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

FLUSH_BYTES = 256 << 20
TARGET_MS = 100.0  # time spent in timed replays per measurement
MIN_REPS, MAX_REPS = 20, 400


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def warm_for_capture(fn: Callable[[], object], device: torch.device) -> None:
    """Compile, autotune and allocate outside a capture, on a side stream as capture requires."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)


def time_op(fn: Callable[[], object], device: torch.device) -> dict:
    """Median and 20th/80th percentile time of ``fn`` in microseconds (see the module docstring).

    On the CPU (Triton interpreter) it is wall-clock time of a few calls: a smoke test, never a
    speed claim.
    """
    if device.type != "cuda":
        return _summary(_wall(fn), "wall clock (CPU)")

    warm_for_capture(fn, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)

    def timed(reps: int) -> list[float]:
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in pairs:
            flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) * 1e3 for start, end in pairs]

    estimate = statistics.median(timed(5))
    reps = max(MIN_REPS, min(MAX_REPS, int(TARGET_MS * 1e3 / max(estimate, 1.0))))
    samples = sorted(timed(reps))
    return {"median_us": statistics.median(samples), "p20_us": percentile(samples, 0.2),
            "p80_us": percentile(samples, 0.8), "reps": reps, "timer": "CUDA graph replay, L2 flushed"}


def time_stream(fns: list[Callable[[], object]], device: torch.device) -> dict:
    """Time per call of a stream of calls, each on its own copy of the data, captured in one graph.

    Why (notes/kernels.md): a single-kernel graph replayed after an L2 flush carries a fixed cost
    that is not the kernel's: the graph launch behind the timing event, and the write-back of the 50 MB
    of dirty flush lines that the kernel's first reads evict. On the H100 that was ~8 us per op, a third
    of a 25 us GEMV. A decode step is a stream of kernels inside one graph, each reading weights that
    are not in L2 and evicting clean lines of the weights before it; this reproduces that: the calls
    run back to back on copies of the weights whose total is several L2 sizes, so each call reads from
    DRAM. The figure includes the gap between kernels of one graph, as a decode step does.
    """
    if device.type != "cuda" or len(fns) == 1:
        return time_op(fns[0], device)

    def all_calls():
        for fn in fns:
            fn()

    t = time_op(all_calls, device)
    n = len(fns)
    return {"median_us": t["median_us"] / n, "p20_us": t["p20_us"] / n, "p80_us": t["p80_us"] / n,
            "reps": t["reps"], "calls_per_replay": n,
            "timer": f"CUDA graph of {n} calls on {n} copies of the data, L2 flushed before each replay"}


def time_steady(fns: list[Callable[[], object]], device: torch.device) -> dict:
    """Per call of a stream of calls in steady state: one graph runs the calls once over, another twice over (the
    same copies of the data, in the same order), each replayed after the same L2 flush; per call = (twice - once) / n.

    Why (notes/kernels.md): :func:`time_stream` divides a whole replay by its calls, so whatever a replay pays
    once is spread over only its n calls (4 for most GEMV cases of an OPT-13B/30B size): the graph's launch behind
    the start event and, above all, the write-back of the dirty lines the flush leaves in L2 (up to 50 MB on the
    H100), which the first calls' reads evict. Measured rows of our GEMV fit
    ``1.4 us + bytes / 3.14 TB/s + 17.2 us / n``.
    A decode step has neither: its kernels evict clean lines of the weights before them. Here both graphs pay those
    costs once and they cancel; what is left is what one more call adds to a stream of such calls, its gap to the
    call before it included. The second pass reads copy 1 again only after every other copy (256 MB or more
    together) has gone through L2, so it is as cold as the first. ``p20_us``/``p80_us`` are the differences of the
    two graphs' 20th/80th percentiles over n: a spread, not percentiles of a per-call sample.
    """
    if device.type != "cuda":
        return time_stream(fns, device)
    if len(fns) == 1:
        t = time_op(fns[0], device)
        return {**t, "timer": f"{t['timer']} (one copy of the data: no steady state to take)"}
    n = len(fns)

    def once():
        for fn in fns:
            fn()

    def twice():
        once()
        once()

    a = time_op(once, device)
    b = time_op(twice, device)
    per = {q: (b[q] - a[q]) / n for q in ("median_us", "p20_us", "p80_us")}
    return {**per, "reps": min(a["reps"], b["reps"]), "calls_per_replay": n,
            "replay_once_us": a["median_us"], "replay_twice_us": b["median_us"],
            "timer": f"steady: (graph of {2 * n} calls - graph of {n} calls) / {n}, {n} copies of the data, "
                     "L2 flushed before each replay"}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict:
    """Measured device-to-device copy bandwidth (bytes read plus bytes written): the ceiling that
    every "% of copy bandwidth" figure divides by.

    Timed eagerly with ``do_bench``, not as a graph replay: inside a CUDA graph torch's copy became
    a memcpy node that ran at 2.42 TB/s on the H100 against 3.00 TB/s eagerly (notes/kernels.md), and the
    lower ceiling would flatter every kernel. Both are returned; the higher one is the ceiling.
    """
    if device.type != "cuda":
        return {"copy_gbps": None, "copy_bytes": 0}
    import triton

    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    for _ in range(3):  # bring the clocks up before the figure that counts
        dst.copy_(src)
    eager_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    graph_us = time_op(lambda: dst.copy_(src), device)["median_us"]
    eager = moved / (eager_ms * 1e-3) / 1e9
    graph = moved / (graph_us * 1e-6) / 1e9
    return {"copy_gbps": max(eager, graph), "copy_gbps_eager": eager, "copy_gbps_graph": graph, "copy_bytes": moved}


def _wall(fn, reps: int = 3) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return sorted(out)


def _summary(samples: list[float], timer: str, **extra) -> dict:
    samples = sorted(samples)
    return {"median_us": statistics.median(samples), "p20_us": percentile(samples, 0.2),
            "p80_us": percentile(samples, 0.8), "reps": len(samples), "timer": timer, **extra}


def time_eager(fn: Callable[[], object], device: torch.device, reps: int = 100) -> dict:
    """The op as a Python caller sees it (``triton.testing.do_bench``'s way): each call launched from Python after
    an L2 flush, timed by CUDA events recorded around it, so the launch path's host cost shows wherever it exceeds
    the kernel's own time. On the CPU: wall clock of a few calls (a smoke test)."""
    if device.type != "cuda":
        return _summary(_wall(fn), "eager, wall clock (CPU)")
    for _ in range(3):
        fn()
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) * 1e3 for s, e in pairs], "eager: events around each Python call, L2 flushed")


def time_cold_graph(fn: Callable[[], object], device: torch.device, n: int = 20) -> dict:
    """The kernel's own time on cold data: a CUDA graph of ``n`` (L2 flush, call) pairs minus a graph of the ``n``
    flushes alone, per call, over several replays. What the eager timer should come close to once the launch path is
    cheap. On the CPU: wall clock."""
    if device.type != "cuda":
        return _summary(_wall(fn), "cold graph, wall clock (CPU)")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    warm_for_capture(fn, device)
    with_calls, flushes = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(with_calls):
        for _ in range(n):
            flush.zero_()
            fn()
    with torch.cuda.graph(flushes):
        for _ in range(n):
            flush.zero_()

    def replay(graph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) * 1e3

    samples = []
    for _ in range(15):
        samples.append((replay(with_calls) - replay(flushes)) / n)
    return _summary(samples, f"cold graph: (graph of {n} flush+call - graph of {n} flushes) / {n}")


def host_cost(fn: Callable[[], object], device: torch.device, n: int = 200) -> dict:
    """Host time of one call: the wall time to enqueue ``n`` calls back to back without synchronising, divided by
    ``n`` (after warm-up and a synchronisation, so autotuning and compilation are not counted; the GPU's queue is deep
    enough that it does not throttle 200 launches). Five repeats."""
    if device.type != "cuda":  # the interpreter runs each call to its end: a few calls say as much
        n = min(n, 3)
    for _ in range(3 if device.type == "cuda" else 1):
        fn()
    samples = []
    for _ in range(5 if device.type == "cuda" else 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) * 1e6 / n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _summary(samples, f"host: wall time to enqueue {n} calls without synchronising / {n}"
                    + (" (CPU: the call runs to the end)" if device.type != "cuda" else ""))
