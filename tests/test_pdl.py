"""Programmatic dependent launch settings (the GPU behaviour is tested in test_gpu.py)."""

import pytest
import torch

from shadow_kernels.pdl import pdl_enabled, pdl_kwargs, set_pdl


def test_set_pdl_takes_a_bool_and_returns_the_previous_setting():
    with pytest.raises(TypeError, match="True or False"):
        set_pdl("yes")
    prev = set_pdl(False)
    try:
        assert set_pdl(True) is False
        assert set_pdl(prev) is True
    finally:
        set_pdl(prev)


def test_never_on_the_cpu_or_in_the_interpreter():
    cpu = torch.device("cpu")
    prev = set_pdl(True)
    try:
        assert not pdl_enabled(cpu)
        assert pdl_kwargs(cpu) == {"USE_PDL": False}
        assert pdl_kwargs(cpu, pdl=True) == {"USE_PDL": False}
    finally:
        set_pdl(prev)
