"""pytest-benchmark entry for `tox -e bench`: times the kernels at one OPT-13B shape per op on a GPU.

The full sweep with rows, bandwidth and baselines is `shadowbench kernels`; this is the quick
regression check that pytest-benchmark can compare between commits.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("tox -e bench needs a CUDA GPU; none found, nothing to time", allow_module_level=True)

from bench.kernels import Case, build_case  # noqa: E402
from models.registry import get_spec  # noqa: E402


@pytest.mark.parametrize("op", ["fc1", "fc2", "qkv", "out_proj", "predictor_dejavu", "topk_global"])
def test_kernel(benchmark, op):
    spec = get_spec("opt-13b")
    built = build_case(spec, Case("opt-13b", op, 0.5, 1), torch.float16, torch.device("cuda"),
                       torch.Generator(device="cuda").manual_seed(0))
    fn = built.variants["triton"]

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark(run)
