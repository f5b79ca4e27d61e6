"""Sparse GEMV and decode attention kernels (Triton) and their plain PyTorch references.

Import is safe without Triton or a GPU: the ops then run their references.
"""

from .ops import (HAVE_TRITON, decode_attention, max_kernel_rows, rmsnorm_topk, threshold_linear, topk_gate_up,
                  topk_linear)
from .reference import (decode_attention_ref, rmsnorm_ref, rmsnorm_topk_ref, threshold_gemv_ref, topk_gate_up_ref,
                        topk_gemv_ref, topk_keep_mask)

__all__ = ["HAVE_TRITON", "decode_attention", "decode_attention_ref", "max_kernel_rows", "rmsnorm_ref",
           "rmsnorm_topk", "rmsnorm_topk_ref", "threshold_linear", "topk_gate_up", "topk_linear",
           "threshold_gemv_ref", "topk_gate_up_ref", "topk_gemv_ref", "topk_keep_mask"]
