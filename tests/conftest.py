"""Tests run on CPU through Triton's interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a kernel
is defined), hence here, at the top of the first file pytest loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Correctness over many random shapes; speed is the benchmark's business.
os.environ.setdefault("SHADOW_KERNELS_AUTOTUNE", "0")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# ||out - ref|| / ||ref|| against an fp32 reference: one rounding of the output dominates
# (fp16 2^-11, bf16 2^-8; the interpreter truncates bf16 stores, a full ulp).
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; runs on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
