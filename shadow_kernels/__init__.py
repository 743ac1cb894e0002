"""Triton kernels for contextual sparsity, each with a plain-PyTorch reference of the same signature.

On a machine without CUDA, importing this package turns on Triton's interpreter
(``TRITON_INTERPRET=1``) unless the variable is already set, so the kernels run (slowly) on CPU
tensors. Triton reads the variable when a kernel is defined, hence before the submodules import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .embed import embed_add, embed_add_ref  # noqa: E402
from .fused_predictor import (  # noqa: E402
    fused_predictor,
    fused_predictor_ref,
    quantize_rows_fp8,
    sparse_hidden_predictor,
    sparse_hidden_predictor_ref,
)
from .gather_cols import gather_cols_gemv, gather_cols_gemv_ref  # noqa: E402
from .gather_rows import (  # noqa: E402
    gather_rows_gemv,
    gather_rows_gemv_ref,
    gather_swiglu_gemv,
    gather_swiglu_gemv_ref,
)
from .gather_segments import gather_segments_gemv, gather_segments_gemv_ref  # noqa: E402
from .greedy import greedy_next, greedy_next_ref  # noqa: E402
from .head_plan import HeadPlanBuffers, head_plan, head_plan_ref  # noqa: E402
from .norm_gemv import (  # noqa: E402
    NormFold,
    fold_norm,
    norm_rows_gemv,
    norm_rows_gemv_ref,
    norm_swiglu_gemv,
    norm_swiglu_gemv_ref,
)
from .pdl import pdl_enabled, set_pdl  # noqa: E402
from .threshold import (  # noqa: E402
    add_rms_threshold_cols_gemv,
    add_rms_threshold_cols_gemv_ref,
    threshold_cols_gemv,
    threshold_cols_gemv_ref,
    threshold_select,
)
from .topk import (  # noqa: E402
    POLICIES,
    LayerIndices,
    mask_to_indices,
    mask_to_indices_ref,
    topk_indices,
    topk_indices_ref,
    topk_mask,
)

__all__ = [
    "add_rms_threshold_cols_gemv",
    "add_rms_threshold_cols_gemv_ref",
    "POLICIES",
    "LayerIndices",
    "NormFold",
    "embed_add",
    "embed_add_ref",
    "fold_norm",
    "fused_predictor",
    "fused_predictor_ref",
    "gather_cols_gemv",
    "gather_cols_gemv_ref",
    "gather_rows_gemv",
    "gather_rows_gemv_ref",
    "gather_segments_gemv",
    "gather_segments_gemv_ref",
    "gather_swiglu_gemv",
    "gather_swiglu_gemv_ref",
    "greedy_next",
    "greedy_next_ref",
    "HeadPlanBuffers",
    "head_plan",
    "head_plan_ref",
    "mask_to_indices",
    "mask_to_indices_ref",
    "norm_rows_gemv",
    "norm_rows_gemv_ref",
    "norm_swiglu_gemv",
    "norm_swiglu_gemv_ref",
    "pdl_enabled",
    "quantize_rows_fp8",
    "set_pdl",
    "sparse_hidden_predictor",
    "sparse_hidden_predictor_ref",
    "threshold_cols_gemv",
    "threshold_cols_gemv_ref",
    "threshold_select",
    "topk_indices",
    "topk_indices_ref",
    "topk_mask",
]
