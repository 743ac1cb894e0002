"""Decoders, modes, pruning criteria and predictors. For now: the model-size registry."""

from .registry import MODELS, ModelSpec, get_spec

__all__ = ["MODELS", "ModelSpec", "get_spec"]
