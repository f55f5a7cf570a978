"""Process-level set-up: BLAS routing, device choice, memory accounting.

Importing this package loads OpenBLAS globally on Linux before ``mlx.core`` is imported
anywhere in lmx, so it must stay the first thing ``lmx/__init__.py`` imports.
"""

from __future__ import annotations

from lmx.runtime.blas import BlasStatus, ensure_openblas

BLAS: BlasStatus = ensure_openblas()

__all__ = ["BLAS", "BlasStatus", "ensure_openblas"]
