"""fastexit.kernels: the two hot paths of early-exit language models.

Triton kernels on CUDA, lean PyTorch paths everywhere else. Imports only torch and triton.
"""
from .backend import BACKENDS, HAS_TRITON, resolve_backend
from .compaction import compact_indices, gather_rows, replace_rows, scatter_rows, select_rows
from .exit_confidence import ExitStats, exit_confidence
from .weighted_ce import weighted_linear_cross_entropy

__all__ = ["BACKENDS", "HAS_TRITON", "resolve_backend", "weighted_linear_cross_entropy",
           "ExitStats", "exit_confidence", "compact_indices", "gather_rows", "scatter_rows",
           "select_rows", "replace_rows"]
