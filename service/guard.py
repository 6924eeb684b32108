"""The non-finite guard: no NaN or Inf enters a decision, is stored in a session or is sent.

Inputs are checked as the model will see them (float32), so a finite JSON number beyond
float32's range is refused before anything runs. Outputs are checked before a session is
written: a decision whose result is not finite leaves the session as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float32(values: Any) -> np.ndarray:
    """`values` as float32; what overflows becomes Inf (and is then refused), quietly."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values).astype(np.float32)


def non_finite_paths(tree: Any, path: str = "") -> list[str]:
    """Where a tree of dicts, lists, arrays and numbers holds NaN or Inf (empty: nowhere)."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in non_finite_paths(v, f"{path}.{k}")]
    if isinstance(tree, list | tuple):
        return [p for i, v in enumerate(tree) for p in non_finite_paths(v, f"{path}[{i}]")]
    if isinstance(tree, float) or hasattr(tree, "__array__"):  # numbers, numpy, JAX arrays
        arr = np.asarray(tree)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return [path.lstrip(".") or "(value)"]
    return []
