"""Decoders (OPT, Llama), sparsity plans, modes, predictors, checkpoint loading and generation.

Submodules are imported where used (``models.opt``, ``models.llama``, ``models.modes``,
``models.generate``, ``models.loading``); this package exports the model-size registry.
"""

from .registry import MODELS, ModelSpec, get_spec

__all__ = ["MODELS", "ModelSpec", "get_spec"]
