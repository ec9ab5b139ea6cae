"""'Plain' NNLS on library-size-normalised data (the baseline of the real-tissue issue).

Unlike ``napari_stlnmf.baselines.nnls_proportions`` (which reuses STL NMF's inputs: its marker
genes, its per-gene weights and its scale), this is the textbook baseline:

1. genes: every gene shared by the slide and the reference (no marker selection, no weights);
2. each spot: its counts on those genes divided by their total (library-size normalisation);
3. reference: each single cell's counts on those genes divided by their total, then averaged
   per type (the per-type mean normalised expression; each profile sums to 1). A signature
   reference (genes x types of mean counts) has each column divided by its total instead;
4. per spot, ``w = argmin_{w >= 0} ||x - P w||²`` (``scipy.optimize.nnls``), and
   ``w / sum(w)`` are the **mRNA fractions** (profiles that sum to 1 make ``w`` shares of the
   spot's transcripts);
5. **cell fractions** = mRNA fractions divided by each type's mean counts per cell on those genes
   (from the reference), renormalised per spot.

Spots without counts on the shared genes get NaN.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import nnls


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def reference_profiles(reference, genes, cell_type_key=None):
    """(profiles genes x types, each column summing to 1; mean counts per cell per type)."""
    if isinstance(reference, pd.DataFrame):
        sig = reference.loc[genes].astype(float)
        totals = sig.sum(0)
        return sig / totals, totals
    sub = reference[:, genes]
    X = _dense(sub.X)
    lib = X.sum(1)
    keep = lib > 0
    labels = sub.obs[cell_type_key].astype(str).to_numpy()[keep]
    norm = pd.DataFrame(X[keep] / lib[keep, None], columns=genes)
    prof = norm.groupby(labels).mean().T  # genes x types (sorted)
    content = pd.Series(lib[keep]).groupby(labels).mean()
    return prof, content.reindex(prof.columns)


def nnls_normalised(slide: ad.AnnData, reference, cell_type_key=None):
    """(cell fractions, mRNA fractions) DataFrames, spots x types; see the module docstring."""
    names = reference.index if isinstance(reference, pd.DataFrame) else reference.var_names
    ref_genes = set(names.astype(str))
    genes = [g for g in slide.var_names.astype(str) if g in ref_genes]
    P, content = reference_profiles(reference, genes, cell_type_key)
    X = _dense(slide[:, genes].X)
    lib = X.sum(1)
    W = np.full((slide.n_obs, P.shape[1]), np.nan)
    Pm = P.to_numpy(np.float64)
    for i in np.flatnonzero(lib > 0):
        w = nnls(Pm, X[i] / lib[i])[0]
        W[i] = w / max(w.sum(), 1e-300)
    cells = W / content.to_numpy(float)[None, :]
    cells = cells / np.maximum(cells.sum(1, keepdims=True), 1e-300)
    cols = [str(c) for c in P.columns]
    return (
        pd.DataFrame(cells, index=slide.obs_names, columns=cols),
        pd.DataFrame(W, index=slide.obs_names, columns=cols),
    )
