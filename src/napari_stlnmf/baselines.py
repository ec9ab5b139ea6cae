"""Reference baselines on the same inputs as STL NMF: per-spot NNLS, and NNLS + smoothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from .model import to_cell_fractions
from .preprocess import build_reference, prepare


def nnls_proportions(
    slide,
    reference,
    *,
    cell_type_key=None,
    smooth: bool = False,
    n_markers: int = 100,
    fractions: str = "cell",
) -> pd.DataFrame:
    """Cell fractions (or, ``fractions='mrna'``, mRNA fractions) by per-spot NNLS on the same
    genes and gene weights as STL NMF, with the same conversions.

    ``smooth=True`` averages each spot's estimate with its graph neighbours' afterwards.
    Spots without counts get NaN.
    """
    if fractions not in ("cell", "mrna"):
        raise ValueError(f"fractions must be 'cell' or 'mrna', not {fractions!r}")
    ref = build_reference(reference, cell_type_key=cell_type_key)
    prep = prepare(slide.X, slide.var_names, ref, n_markers=n_markers)
    B = prep.B * prep.gene_weights[:, None]
    X = prep.X.toarray() * prep.gene_weights[None, :]
    V = np.array([nnls(B.astype(np.float64), x.astype(np.float64))[0] for x in X])
    V = V / np.maximum(V.sum(1, keepdims=True), 1e-12)
    if smooth:
        from .graph import build_graph

        g = build_graph(np.asarray(slide.obsm["spatial"])[prep.spot_mask])
        A = g.adjacency(1.0)
        A.setdiag(1.0)
        V = (A @ V) / np.asarray(A.sum(1))
    out = np.full((slide.n_obs, V.shape[1]), np.nan)
    # divide by each type's mRNA per cell (cells) or its share of mRNA in these genes (all mRNA)
    out[prep.spot_mask] = to_cell_fractions(
        V, prep.mrna_content if fractions == "cell" else prep.gene_share
    )
    return pd.DataFrame(out, index=slide.obs_names, columns=prep.cell_types)
