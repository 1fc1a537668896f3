"""fastexit.kernels: the two hot paths of early-exit language models.

Triton kernels on CUDA, lean PyTorch paths everywhere else. Imports only torch and triton.
"""
if __name__ == "fastexit.kernels":
    from .backend import BACKENDS, HAS_TRITON, resolve_backend
    from .compaction import compact_indices, gather_rows, replace_rows, scatter_rows, select_rows
    from .exit_confidence import ExitStats, exit_confidence
    from .weighted_ce import weighted_linear_cross_entropy

    __all__ = ["BACKENDS", "HAS_TRITON", "resolve_backend", "weighted_linear_cross_entropy",
               "ExitStats", "exit_confidence", "compact_indices", "gather_rows", "scatter_rows",
               "select_rows", "replace_rows"]
else:  # reached as the top-level name `kernels` from the repository root: see _top_level.py
    from ._top_level import stand_aside
    stand_aside(__name__)
