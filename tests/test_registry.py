import pytest

from models.registry import MODELS, get_spec


def test_opt_13b_shapes():
    spec = get_spec("opt-13b")
    assert (spec.hidden, spec.ffn, spec.n_layers, spec.n_heads, spec.head_dim) == (5120, 20480, 40, 40, 128)


def test_every_head_dim_divides():
    assert all(spec.hidden % spec.n_heads == 0 and spec.n_heads % spec.n_kv_heads == 0 for spec in MODELS.values())


def test_registry_is_frozen():
    with pytest.raises(TypeError):
        MODELS["x"] = None


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'opt-7b'; known models: opt-125m"):
        get_spec("opt-7b")
