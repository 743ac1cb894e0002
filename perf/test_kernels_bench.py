"""pytest-benchmark entry for `tox -e bench`: each kernel at one shape per op, called from Python as a user calls it.

On a GPU the shape is OPT-13B's at sparsity 0.5; without one it is the registry's ``tiny`` shape in Triton's
interpreter, which checks that every op runs and gives pytest-benchmark something to compare between commits, but
is not GPU speed. The full sweep with rows, bandwidth and baselines is `shadowbench kernels`.
"""

import pytest
import torch

from bench.kernels import Case, build_case, rel_err
from models.registry import get_spec

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = "opt-13b" if DEVICE.type == "cuda" else "tiny"


@pytest.mark.parametrize("op", ["fc1", "fc2", "qkv", "out_proj", "predictor_dejavu", "topk_global"])
def test_kernel(benchmark, op):
    built = build_case(get_spec(MODEL), Case(MODEL, op, 0.5, 1), torch.float16, DEVICE,
                       torch.Generator(device=DEVICE).manual_seed(0))
    fn = built.variants["triton"]
    if built.reference is not None and op.startswith(("fc", "qkv", "out")):
        assert rel_err(fn(), built.reference()) < 2e-3

    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(device=str(DEVICE), model=MODEL, op=op, sparsity=0.5)
    benchmark.pedantic(run, rounds=20 if DEVICE.type == "cuda" else 3, warmup_rounds=1)
