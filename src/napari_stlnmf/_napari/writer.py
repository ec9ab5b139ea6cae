"""napari writer: export deconvolution results of result layers (Points, or Image/Labels for
Visium HD bins).

- ``.csv``: one row per barcode with every cell type's proportion, the dominant type,
  its proportion, the per-spot fit error and the QC flag.
- ``.h5ad``: the annotated slide (counts, ``obsm['spatial']``,
  ``obsm['stlnmf_proportions']``, ``obs['stlnmf_fit_error']``, ``uns['stlnmf']``), which
  this plugin's reader opens again with the maps.

The manifest declares the writer for ``points*``, ``image*`` and ``labels*`` (any selection of
those kinds), so it is offered for every result layer and for several selected layers
(napari's own writers take one); it exports the first selected result layer's table, which
all layers of one run share (``metadata['stlnmf_table']``, the same object). Files are
written under a temporary name and renamed, so a failed export never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .._constants import H5AD_COMPRESSION, PROPORTIONS_KEY, SPATIAL_KEY
from ..layers import POSITIONS_KEY, RESULT_TAG, TABLE_KEY, TOP_TYPES_COLUMN

__all__ = ["NoResultsToExport", "write_proportions", "write_result_layers"]


class NoResultsToExport(RuntimeError):
    """No selected layer holds results. Not a ValueError (like :class:`StlnmfError`): napari's
    save silently drops a writer's ValueError, and the user would never see the message."""


def _no_results(names) -> NoResultsToExport:
    shown = ", ".join(repr(n) for n in names) or "no layer"
    return NoResultsToExport(
        f"{shown} holds no STL NMF results. Select a result layer (a cell-type map, "
        "'dominant cell type' or 'fit error'), or use 'Export results…' in the Deconvolve dock."
    )


def _table(meta: dict):
    """The run's one table (shared by its layers), else the layer's features (older layers)."""
    table = (meta.get("metadata") or {}).get(TABLE_KEY)
    return meta.get("features") if table is None else table


def _is_result(meta: dict) -> bool:
    metadata = meta.get("metadata") or {}
    features = _table(meta)
    return (
        RESULT_TAG in metadata
        and bool(metadata.get("cell_types"))
        and features is not None
        and len(features) > 0
    )


def _result_table(meta: dict) -> pd.DataFrame:
    if not _is_result(meta):
        raise _no_results([meta.get("name")])
    table = pd.DataFrame(_table(meta)).copy()
    return table.drop(columns=[TOP_TYPES_COLUMN], errors="ignore")  # hover text only


def _partial_path(path: Path) -> Path:
    """A sibling of ``path`` with the same suffix (anndata and pandas go by it)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_proportions(path: str, data, meta: dict) -> list[str]:
    """Write one result layer's proportions to ``.csv`` (by barcode) or ``.h5ad``."""
    p = Path(path)
    table = _result_table(meta)
    metadata = meta["metadata"]
    if p.suffix.lower() != ".h5ad" and p.suffix.lower() != ".csv":
        p = p.with_suffix(".csv")
    partial = _partial_path(p)
    try:
        if p.suffix.lower() == ".h5ad":
            adata = metadata.get("adata")
            if adata is None:  # no annotated copy kept: rebuild a minimal one from the table
                import anndata as ad

                types = list(metadata["cell_types"])
                obs = table.drop(columns=types).set_index("barcode")
                adata = ad.AnnData(obs=obs)
                yx = metadata.get(POSITIONS_KEY)
                yx = data if yx is None else yx  # Points: the data are the positions
                adata.obsm[SPATIAL_KEY] = np.asarray(yx, dtype=np.float64)[:, ::-1]
                adata.obsm[PROPORTIONS_KEY] = table.set_index("barcode")[types]
            adata.write_h5ad(partial, **H5AD_COMPRESSION)
        else:
            table.to_csv(partial, index=False, float_format="%.6g")
        os.replace(partial, p)
    finally:
        partial.unlink(missing_ok=True)
    return [str(p)]


def write_result_layers(path: str, layer_data: list[tuple]) -> list[str]:
    """napari's multi-layer writer: export the first result layer among ``layer_data``."""
    for data, meta, _kind in layer_data:
        if _is_result(meta):
            return write_proportions(path, data, meta)
    raise _no_results([meta.get("name") for _, meta, _ in layer_data])
