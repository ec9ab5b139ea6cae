"""napari writer: export deconvolution results of a result (or slide) Points layer.

- ``.csv``: one row per barcode with every cell type's proportion, the dominant type,
  its proportion, the per-spot fit error and the QC flag.
- ``.h5ad``: the annotated slide (counts, ``obsm['spatial']``,
  ``obsm['stlnmf_proportions']``, ``obs['stlnmf_fit_error']``, ``uns['stlnmf']``), which
  this plugin's reader opens again with the maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .._constants import PROPORTIONS_KEY, SPATIAL_KEY
from ..errors import StlnmfError
from ..layers import RESULT_TAG


def _result_table(meta: dict) -> pd.DataFrame:
    metadata = meta.get("metadata") or {}
    features = meta.get("features")
    types = metadata.get("cell_types")
    if RESULT_TAG not in metadata or not types or features is None or len(features) == 0:
        raise StlnmfError(
            f"Layer {meta.get('name')!r} holds no STL NMF results. Select a result layer "
            "(a cell-type map, 'dominant cell type' or 'fit error') to export proportions."
        )
    return pd.DataFrame(features).copy()


def write_proportions(path: str, data, meta: dict) -> list[str]:
    """Write a result layer's proportions to ``.csv`` (by barcode) or ``.h5ad``."""
    p = Path(path)
    table = _result_table(meta)
    metadata = meta["metadata"]
    if p.suffix.lower() == ".h5ad":
        adata = metadata.get("adata")
        if adata is None:  # no annotated copy kept: rebuild a minimal one from the table
            import anndata as ad

            types = list(metadata["cell_types"])
            obs = table.drop(columns=types).set_index("barcode")
            adata = ad.AnnData(obs=obs)
            adata.obsm[SPATIAL_KEY] = np.asarray(data, dtype=np.float64)[:, ::-1]
            adata.obsm[PROPORTIONS_KEY] = table.set_index("barcode")[types]
        adata.write_h5ad(p, compression="gzip")
    else:
        if p.suffix.lower() != ".csv":
            p = p.with_suffix(".csv")
        table.to_csv(p, index=False, float_format="%.6g")
    return [str(p)]
