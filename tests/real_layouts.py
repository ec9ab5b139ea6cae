"""The bundled demo as real files hold it (used by tests/io/test_counts.py and
tests/test_real_inputs.py): log-normalised the scanpy way, written with numpy, with the raw
counts in layers['counts'] or in .raw."""

from __future__ import annotations

import anndata as ad
import numpy as np
from scipy import sparse


def normalize_total(X, target_sum: float = 1e4) -> sparse.csr_matrix:
    """sc.pp.normalize_total(adata, target_sum=1e4), with numpy."""
    X = sparse.csr_matrix(X, dtype=np.float32)
    lib = np.asarray(X.sum(1)).ravel()
    return (sparse.diags((target_sum / np.maximum(lib, 1)).astype(np.float32)) @ X).tocsr()


def log_normalised(X) -> sparse.csr_matrix:
    """normalize_total to 1e4 then sc.pp.log1p, as scanpy tutorials leave X."""
    out = normalize_total(X)
    out.data = np.log1p(out.data)
    return out


def with_counts_in_layer(adata: ad.AnnData) -> ad.AnnData:
    """The scanpy tutorial's layout: raw counts in layers['counts'], X log-normalised."""
    out = adata.copy()
    out.layers["counts"] = adata.X.copy()
    out.X = log_normalised(adata.X)
    return out


def with_counts_in_raw(adata: ad.AnnData, n_hvg: int = 300) -> ad.AnnData:
    """The other scanpy layout: ``adata.raw = adata`` before normalising, then X log-normalised
    and subset to highly variable genes (so .raw has more genes than X)."""
    out = adata.copy()
    out.raw = out
    out.X = log_normalised(out.X)
    return out[:, out.var_names[:n_hvg]].copy()
