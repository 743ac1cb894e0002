"""Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with it may start while the
kernel before it in the stream is finishing, so the launch and ramp-up of one kernel overlap the tail of
the other. A decode step is hundreds of short kernels in one CUDA graph, and those gaps add up.

The contract that keeps it correct, followed by every kernel of this package that takes ``USE_PDL``:
the kernel calls ``gdc_wait`` (wait until the previous grid has finished and its writes are visible)
before it reads anything, then ``gdc_launch_dependents`` (the next kernel may be scheduled). One exception,
argued where it is: gather-cols' second kernel, which only sums the workspace its split launch wrote, lets
the next kernel be scheduled first. A kernel launched without PDL (PyTorch, cuBLAS) waits for the previous
one to finish as usual, and one launched with PDL after it starts only when it has finished. So PDL only
removes launch gaps; it never reorders a read before a write.

On by default for CUDA devices of compute capability 9.0 or more (measured on the H100:
OPT-1.3B static s=0.5 1.371 -> 1.262 ms/token, OPT-13B 6.190 -> 6.068, bit-identical outputs);
``set_pdl(False)`` or ``SHADOWBENCH_PDL=0`` turns it off. The Triton interpreter never uses it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, set_switch

_STATE = {"on": os.environ.get("SHADOWBENCH_PDL", "1") != "0"}


@triton.jit
def pdl_sync():
    """The contract above, in the one order that keeps it: wait for the previous grid and its writes, then
    let the next kernel be scheduled (a kernel that calls this under ``USE_PDL``)."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


def set_pdl(on: bool) -> bool:
    """Turn programmatic dependent launch on or off for later launches; returns the previous setting."""
    return set_switch(_STATE, on, "set_pdl")


def pdl_enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` use programmatic dependent launch now."""
    return _STATE["on"] and _capable(device)


def pdl_kwargs(device: torch.device, pdl: bool | None = None) -> dict:
    """Launch keywords of a kernel with a ``USE_PDL`` constexpr: the global setting unless ``pdl`` is given."""
    on = pdl_enabled(device) if pdl is None else (pdl and _capable(device))
    return {"USE_PDL": on, "launch_pdl": on} if on else {"USE_PDL": False}


_CAPABLE: dict = {}  # device index -> compute capability >= 9 (asked once: a launch path must not query the driver)


def _capable(device: torch.device) -> bool:
    if INTERPRET or device.type != "cuda":
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _CAPABLE:
        _CAPABLE[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _CAPABLE[i]
