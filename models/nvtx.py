"""NVTX ranges in one domain ("shadowbench"), free when no profiler is attached.

Uses the ``nvtx`` package when it is installed (it works on machines without a GPU and records only
under a tool such as Nsight Systems); otherwise the ranges are no-ops. Ranges inside a CUDA graph are
recorded when the graph is captured, not when it is replayed: profile with ``--no-cuda-graph`` to see
per-layer ranges.
"""

from __future__ import annotations

from contextlib import nullcontext

DOMAIN = "shadowbench"

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None

_NULL = nullcontext()


def nvtx_range(name: str):
    if _nvtx is None:
        return _NULL
    return _nvtx.annotate(name, domain=DOMAIN)
