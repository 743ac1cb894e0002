"""NVTX ranges in one domain ("shadowbench"), free when no profiler is attached.

Uses the ``nvtx`` package when it is installed (it works on machines without a GPU and records only
under a tool such as Nsight Systems); without it, on CUDA machines, ``torch.cuda.nvtx`` ranges named
``shadowbench:<range>`` in the default domain; otherwise the ranges are no-ops. Ranges inside a CUDA graph are
recorded when the graph is captured, not when it is replayed: profile with ``--no-cuda-graph`` to see
per-layer ranges. While a PyTorch profiler records (``torch.profiler.profile``), each range is also a
``record_function`` named ``shadowbench:<range>``, so a Chrome / Perfetto trace carries the same ranges where
Nsight Systems is not installed.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext

import torch

DOMAIN = "shadowbench"

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None

_NULL = nullcontext()


def _torch_range():
    if not torch.cuda.is_available():
        return None
    return torch.cuda.nvtx.range


_TORCH_RANGE = _torch_range() if _nvtx is None else None


def backend() -> str:
    return "nvtx" if _nvtx is not None else ("torch.cuda.nvtx" if _TORCH_RANGE is not None else "none")


def _nvtx_only(name: str):
    if _nvtx is not None:
        return _nvtx.annotate(name, domain=DOMAIN)
    if _TORCH_RANGE is not None:
        return _TORCH_RANGE(f"{DOMAIN}:{name}")
    return _NULL


def nvtx_range(name: str):
    if not torch.autograd.profiler._is_profiler_enabled:
        return _nvtx_only(name)
    stack = ExitStack()
    stack.enter_context(_nvtx_only(name))
    stack.enter_context(torch.profiler.record_function(f"{DOMAIN}:{name}"))
    return stack
