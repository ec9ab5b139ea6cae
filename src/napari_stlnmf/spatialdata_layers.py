"""Layers opened by napari-spatialdata as slides, and results back into their table (pure:
no Qt, no napari import; spatialdata imported lazily).

napari-spatialdata's layers carry ``metadata['sdata']``, ``['adata']``, ``['region_key']`` and
``['instance_key']``: :func:`spots_from_spatialdata_layer` makes them a slide (moved onto an
image with :func:`napari_stlnmf.layer_frames.slide_on_image`), and
:func:`write_results_to_spatialdata_layer` writes a result into the store's table in memory.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import io
from ._constants import SPATIAL_KEY
from .io._util import examples
from .io.spatialdata import SOURCE_KEY
from .layer_frames import LAYER_DIAMETER_KEY

__all__ = [
    "SPATIALDATA_LAYER_KEYS",
    "is_spatialdata_layer",
    "spots_from_spatialdata_layer",
    "write_results_to_spatialdata_layer",
]

SPATIALDATA_LAYER_KEYS = ("sdata", "adata", "region_key", "instance_key")


def is_spatialdata_layer(metadata) -> bool:
    """Whether a layer's ``metadata`` is napari-spatialdata's for spots with a table."""
    return all(metadata.get(k) is not None for k in SPATIALDATA_LAYER_KEYS)


def _polygon_centre_and_area(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """Area centroid and area of a (row, col) polygon; the vertex mean for degenerate ones and
    ellipses (napari stores an ellipse as its 4 bounding-box corners, whose mean is its centre;
    the area is then the box's, 4/pi of the ellipse's, which only sizes the drawing)."""
    v = np.asarray(vertices, dtype=np.float64)[:, -2:]
    if len(v) < 3:
        return v.mean(axis=0), 0.0
    r, c = v[:, 0], v[:, 1]
    cross = r * np.roll(c, -1) - np.roll(r, -1) * c
    area = cross.sum() / 2
    if abs(area) < 1e-12:
        return v.mean(axis=0), 0.0
    centre = np.array([((r + np.roll(r, -1)) * cross).sum(), ((c + np.roll(c, -1)) * cross).sum()])
    return centre / (6 * area), abs(float(area))


def spots_from_spatialdata_layer(data, metadata, *, sizes=None):
    """A slide from a Points or Shapes layer opened by napari-spatialdata.

    ``metadata['adata']`` (the table rows joined to the element) gives the counts,
    ``metadata['indices']`` the element's instance id of each shape/point of ``data``. Spots
    are matched by ``obs[instance_key]``; shapes/points without a table row are left out.
    ``obsm['spatial']`` is in the layer's *data* (x, y): map it with :func:`slide_on_image`.
    The spot diameter is the element's ``radius`` x 2 when it has one, that of a circle of the
    polygons' median area for shapes, else the median ``sizes`` (a Points layer's).
    """
    import anndata as ad

    from .errors import CoordinateError

    table = metadata["adata"]
    instance_key, region_key = metadata["instance_key"], metadata["region_key"]
    areas = None
    if isinstance(data, np.ndarray):
        yx = np.asarray(data, dtype=np.float64)[:, -2:]
    else:  # Shapes: one vertex array per shape
        centres, areas = zip(*(_polygon_centre_and_area(v) for v in data)) if data else ((), ())
        yx = np.array(centres, dtype=np.float64).reshape(-1, 2)
    indices = metadata.get("indices")
    ids = pd.Index(
        np.asarray(indices if indices is not None else range(len(yx))).astype(str)[: len(yx)]
    )
    table_ids = pd.Index(table.obs[instance_key].astype(str).to_numpy())
    if table_ids.has_duplicates:  # several regions: keep the layer's element's rows
        keep = table.obs[region_key].astype(str).to_numpy() == str(metadata.get("name"))
        table, table_ids = table[keep], table_ids[keep]
    where = ids.get_indexer(table_ids)
    if (where < 0).all():
        raise CoordinateError(
            f"No row of the layer's table has an instance id of its shapes (obs[{instance_key!r}]"
            f" vs the element's index, e.g. {examples(ids)}); re-open the layer."
        )
    rows = np.flatnonzero(where >= 0)
    obs = table.obs.iloc[rows].copy()
    obs.index = table_ids[rows]
    out = ad.AnnData(X=table.X[rows], obs=obs, var=table.var.copy())
    out.obsm[SPATIAL_KEY] = yx[where[rows]][:, ::-1].copy()
    element = _element_or_none(metadata)
    if element is not None and "radius" in getattr(element, "columns", ()):
        diameter = 2.0 * float(np.nanmedian(element["radius"].to_numpy(dtype=np.float64)))
    elif areas:  # polygons: a circle of the same area
        diameter = 2.0 * float(np.sqrt(np.median(areas) / np.pi))
    elif sizes is not None and np.size(sizes):
        diameter = float(np.nanmedian(np.asarray(sizes, dtype=np.float64)))
    else:
        diameter = None
    out.uns[LAYER_DIAMETER_KEY] = diameter
    out.uns[SOURCE_KEY] = {
        "table": str((metadata.get("table_names") or [""])[0] or ""),
        "region": str(metadata.get("name") or ""),
        "region_key": str(region_key),
        "instance_key": str(instance_key),
        "coordinate_system": str(metadata.get("_current_cs") or ""),
        "image": "",
        "path": "",
    }
    return out


def write_results_to_spatialdata_layer(metadata, result) -> str:
    """Write ``result`` into the table of a napari-spatialdata layer's SpatialData (in memory;
    :func:`~napari_stlnmf.io.write_spatialdata_results`) and refresh the layer's
    ``metadata['adata']`` so napari-spatialdata colours the layer by the new columns. Returns
    the table's name."""
    import spatialdata as sd

    sdata = metadata["sdata"]
    io.write_spatialdata_results(sdata, result, save=False)
    table = result.adata.uns[SOURCE_KEY]["table"] or next(iter(sdata.tables))
    _, joined = sd.join_spatialelement_table(
        sdata=sdata, spatial_element_names=metadata["name"], table_name=table,
        how="left", match_rows="left",
    )  # fmt: skip
    metadata["adata"] = joined
    return table


def _element_or_none(metadata):
    try:
        return metadata["sdata"][metadata["name"]]
    except (KeyError, TypeError):
        return None
