"""Sparse GEMV kernels (Triton) and their plain PyTorch references.

Import is safe without Triton or a GPU: the ops then run their references.
"""

from .ops import HAVE_TRITON, max_kernel_rows, threshold_linear, topk_gate_up, topk_linear
from .reference import threshold_gemv_ref, topk_gate_up_ref, topk_gemv_ref, topk_keep_mask

__all__ = ["HAVE_TRITON", "max_kernel_rows", "threshold_linear", "topk_gate_up", "topk_linear",
           "threshold_gemv_ref", "topk_gate_up_ref", "topk_gemv_ref", "topk_keep_mask"]
