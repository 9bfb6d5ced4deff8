"""The similarity engine (DESIGN §4): tiles of S = Φ_R Φ_Cᵀ, never the whole N×N matrix.

Pure functions over numpy / torch arrays; the Ray layer is ``stages/neighbours.py``.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def similarity_tile(rows: np.ndarray | torch.Tensor, cols: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One tile of similarities: (R, d) × (C, d) → (R, C) = rows @ colsᵀ, fp32 (one GEMM)."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    cols = torch.as_tensor(cols, dtype=torch.float32)
    return rows @ cols.T


def iter_similarity_blocks(
    queries: np.ndarray, database: np.ndarray, row_block: int = 1024
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (row offset, S block (R, N_db)) for consecutive row blocks of queries (R ≤ row_block).

    Memory is O(row_block · N_db); used where whole rows are needed (per-query ROC AUC, AP).
    """
    db = torch.as_tensor(np.ascontiguousarray(database), dtype=torch.float32)
    for start in range(0, len(queries), row_block):
        yield start, similarity_tile(queries[start : start + row_block], db)
