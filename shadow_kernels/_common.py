"""Shared plumbing for the kernels: where they run, input checks, autotune settings.

Every public op checks its inputs here once, at the boundary, so the launchers and kernels can
assume well-formed tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# SHADOW_KERNELS_AUTOTUNE=0 keeps the first config of every kernel: the tests check results over
# many random shapes and would otherwise autotune each one.
AUTOTUNE = os.environ.get("SHADOW_KERNELS_AUTOTUNE", "1") != "0"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt_dtypes(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_device(name: str, t: torch.Tensor, device: torch.device | None = None, any_device: bool = False) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors when the Triton interpreter is on; references
    (``any_device``) run anywhere but still need all inputs on one device."""
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; put them on one device")
    if any_device or t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise ValueError(
        f"{name} is on {t.device}; the Triton kernels need CUDA tensors, or CPU tensors with "
        "TRITON_INTERPRET=1 set before shadow_kernels is imported (use the *_ref functions for plain CPU runs)"
    )


def check_float(
    name: str,
    t,
    *,
    ndims: tuple[int, ...],
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    last_contiguous: bool = False,
    any_device: bool = False,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES and t.dtype != dtype:  # an explicitly asked dtype (fp8 weights) also passes
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {_fmt_dtypes(FLOAT_DTYPES)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the weight dtype {dtype}")
    if t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    check_device(name, t, device, any_device)
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), got strides {tuple(t.stride())}; "
            "call .contiguous() once when loading the weight, not per call"
        )


def is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_indices(name: str, idx, *, n: int, device: torch.device, validate: bool) -> None:
    """`idx` is a 1-D integer tensor of row numbers in [0, n).

    The range check reads the values back to the host, which a CUDA graph capture cannot do, so it
    runs only when `validate` is set and no capture is under way.
    """
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} has dtype {idx.dtype}; expected int32 or int64 row indices")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    check_device(name, idx, device)
    if validate and idx.numel() > 0 and not is_capturing(device):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} holds values in [{lo}, {hi}]; expected indices in [0, {n - 1}]")


def check_flag(name: str, value) -> None:
    """A keyword that must be True or False (a constexpr of a kernel: anything else would compile a variant)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_count(name: str, count, *, device: torch.device, upper: int, validate: bool) -> None:
    """`count` is the device-side number of valid entries of a padded index list."""
    if count is None:
        return
    if not isinstance(count, torch.Tensor):
        raise TypeError(f"{name} must be a one-element int32 tensor on the device, got {type(count).__name__}")
    if count.dtype != torch.int32 or count.numel() != 1:
        raise TypeError(f"{name} must be a one-element int32 tensor, got dtype {count.dtype} and shape "
                        f"{tuple(count.shape)}")
    check_device(name, count, device)
    if validate and not is_capturing(device):
        c = int(count.reshape(()))
        if c < 0 or c > upper:
            raise ValueError(f"{name} is {c}; expected a value in [0, {upper}] (the length of the index list)")


def check_indexed_input(x_name: str, x, weight, idx, bias, count, *, n_idx: int, n_out: int, validate: bool,
                        preload) -> None:
    """The checks shared by the GEMVs whose input has one entry per index (gather-cols, gather-segments): ``x``
    [k] or [B, k] in the weight's dtype, ``idx`` [k] in [0, n_idx), ``bias`` [n_out], ``count``, ``preload``."""
    dev = weight.device
    check_float(x_name, x, ndims=(1, 2), dtype=weight.dtype, device=dev)
    check_indices("idx", idx, n=n_idx, device=dev, validate=validate)
    k = idx.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"{x_name} has {x.shape[-1]} entries per row but idx has {k}; expected {x_name} [..., {k}]")
    if bias is not None:
        check_float("bias", bias, ndims=(1,), dtype=weight.dtype, device=dev)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias has {bias.shape[0]} entries; expected {n_out} (one per output)")
    check_count("count", count, device=dev, upper=k, validate=validate)
    check_flag("preload", preload)


def check_pos(pos, device: torch.device, any_device: bool = False) -> None:
    """A decode step's position buffer: a one-element int32/int64 tensor on ``device``."""
    if not isinstance(pos, torch.Tensor) or pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise TypeError("pos must be a one-element int32/int64 tensor on the device (the current position), got "
                        f"{getattr(pos, 'dtype', type(pos).__name__)} {tuple(getattr(pos, 'shape', ()))}")
    check_device("pos", pos, device, any_device)


def zero_past_count(t: torch.Tensor, count) -> torch.Tensor:
    """The references' reading of a padded index list: entries of ``t``'s last dimension (one per index) from
    the device-side ``count`` on set to 0; ``t`` itself when ``count`` is None."""
    if count is None:
        return t
    return torch.where(torch.arange(t.shape[-1], device=t.device) < count.reshape(()), t, 0.0)


def set_switch(state: dict, on, name: str) -> bool:
    """Set a module's on/off ``state["on"]`` (``name`` is the setter, for the error); returns the old value."""
    if not isinstance(on, bool):
        raise TypeError(f"{name} takes True or False, got {on!r}")
    prev, state["on"] = state["on"], on
    return prev


def gemv_kernel_for(batch: int, single, batched) -> tuple:
    """The autotuned kernel of a GEMV for this batch and its BLOCK_B: the batch-1 loop, or the tensor-core path
    over a block of 16-64 batch rows."""
    if batch == 1:
        return single, 1
    return batched, min(64, max(16, next_pow2(batch)))


def bias_only(y: torch.Tensor, bias) -> torch.Tensor:
    """The output of a GEMV over no selected input: the bias in every batch row, or zeros."""
    return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def configs_for_platform(configs: list[triton.Config]) -> list[triton.Config]:
    """The interpreter cannot time configs, so it gets the first one only (so does AUTOTUNE off)."""
    return configs if AUTOTUNE and not INTERPRET else configs[:1]


# Configs are timed on cold data (see autotune_bench); SHADOWBENCH_AUTOTUNE_COLD=0 times them on data that stays
# in L2 when it fits.
AUTOTUNE_COLD = os.environ.get("SHADOWBENCH_AUTOTUNE_COLD", "1") != "0"
SCRUB_BYTES = 128 << 20  # read between timed calls: over twice the H100's 50 MB L2
_SCRUB: dict = {}


def autotune_bench(kernel_call, quantiles):
    """How the autotuner times a config: back to back in one CUDA graph, each call after a clean read of
    128 MB that leaves none of its data in L2, minus the same graph without the calls; a decode step reads
    every weight from DRAM. Without the read, a case smaller than the L2 (OPT-13B out_proj at s=0.5 moves
    26 MB) is tuned on L2 hits. Eager calls after an L2 flush (``do_bench``) add ~8 us of noise to every
    call (the launch behind the timing event, the write-back of the flushed lines), and the autotuner then
    picked different configs from run to run (notes/kernels.md)."""
    if torch.cuda.is_available() and not INTERPRET:
        if AUTOTUNE_COLD:
            return _bench_in_graph(kernel_call, quantiles, rep_ms=10.0, cold=True)
        return _bench_in_graph(kernel_call, quantiles)
    return triton.testing.do_bench(kernel_call, warmup=10, rep=50, quantiles=quantiles)


def _scrubber():
    """A call that reads SCRUB_BYTES (a sum: clean lines, so evicting them later costs no write-back)."""
    dev = torch.cuda.current_device()
    buf = _SCRUB.get(dev)
    if buf is None:
        buf = _SCRUB[dev] = torch.zeros(SCRUB_BYTES // 4, dtype=torch.float32, device=dev)
    return lambda: buf.sum()


def _graph_of(calls, n):
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=side):
        for _ in range(n):
            for call in calls:
                call()
    torch.cuda.synchronize()
    return graph


def _replay_ms(graph, reps: int = 10) -> list[float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _bench_in_graph(kernel_call, quantiles, rep_ms: float = 20.0, cold: bool = False):
    """Like ``triton.testing.do_bench_cudagraph``, but the device is synchronised first: that function
    starts on a fresh stream without waiting for the work already queued, so the first kernel of a
    new shape (autotuned mid-step) would run concurrently with the step's earlier kernels (seen as wrong
    results and an illegal address where kernels shared counters). ``cold``: a
    128 MB read before every call, its time (a graph of the reads alone) subtracted."""
    torch.cuda.synchronize()
    scrub = _scrubber() if cold else None
    kernel_call()
    torch.cuda.synchronize()
    calls = [scrub, kernel_call] if cold else [kernel_call]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        for call in calls:
            call()
    end.record()
    torch.cuda.synchronize()
    n = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    graph = _graph_of(calls, n)
    times = _replay_ms(graph)
    del graph
    if cold:
        base = _graph_of([scrub], n)
        base_ms = sorted(_replay_ms(base))
        floor = base_ms[len(base_ms) // 2]  # the median replay of the reads alone
        del base
        times = [max(t - floor, 1e-6) for t in times]
    times = sorted(t / n for t in times)
    if quantiles is None:
        return sum(times) / len(times)
    return [times[min(len(times) - 1, round(q * (len(times) - 1)))] for q in quantiles]


_SM_COUNT: dict = {}  # device index -> SMs (asked once: launchers call this for every config of every call)


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


@triton.jit
def dot_acc(acc, x, w, UPCAST_DOT: tl.constexpr, DOT_IEEE: tl.constexpr):
    """``acc + x @ w`` for the batched GEMV paths: 16-bit operands on the tensor cores with fp32 accumulation
    (x converted to w's dtype), both upcast to fp32 where ``UPCAST_DOT`` (the interpreter; fp32 activations with
    16-bit weights), and IEEE fp32 products where ``DOT_IEEE`` (fp32 weights) instead of TF32."""
    if UPCAST_DOT:
        w = w.to(tl.float32)
        x = x.to(tl.float32)
    else:
        x = x.to(w.dtype)
    if DOT_IEEE:
        acc += tl.dot(x, w, input_precision="ieee")
    else:
        acc += tl.dot(x, w)
    return acc
