"""napari reader: every registered slide format whose files place the spots themselves.

Today: Space Ranger ``outs/`` folders, ``.h5ad`` slides with ``obsm['spatial']`` and SpatialData
``.zarr`` stores (with ``napari-stlnmf[spatialdata]``; see :mod:`napari_stlnmf.io.registry`).
Opens the tissue image (scaled to full-resolution pixels; for SpatialData, placed in the
store's 'global' coordinate system like napari-spatialdata's layers) and the spots as a Points
layer; an ``.h5ad`` written by this plugin's writer, or a store whose table holds results,
also brings back the result layers.
"""

from __future__ import annotations

from pathlib import Path

from ..io.registry import find_slide_format
from ..layers import result_layers_from_adata, slide_layers


def napari_get_reader(path):
    """Return :func:`read_slide_layers` if ``path`` is a slide this plugin reads, else None.

    Cheap and never raises: the registered formats' ``detect`` and ``has_positions`` look
    at names and keys only, and a file that needs ``coords=`` (a counts table) or a
    single-cell reference ``.h5ad`` (no ``obsm['spatial']``) is left to other readers.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        p = Path(path)
        fmt = find_slide_format(p)
        ok = fmt is not None and fmt.has_positions(p)
    except Exception:  # noqa: BLE001 -- reader contract: never raise, unreadable = not ours
        return None
    return read_slide_layers if ok else None


def read_slide_layers(path) -> list[tuple]:
    """Read a slide (and saved results, if any) as napari layer-data tuples."""
    from .. import io

    if isinstance(path, (list, tuple)):
        path = path[0]
    p = Path(path)
    adata = io.read_slide(p)
    name = p.parent.name if p.name == "outs" else p.stem if p.is_file() else p.name
    layers = slide_layers(adata, name=name, path=p)
    source = layers[-1][1]["metadata"]["stlnmf_slide"]["slide_id"]
    results = result_layers_from_adata(adata, source=source)
    if results:  # saved results: hide the plain spots so the maps show
        layers[-1][1]["visible"] = False
    return layers + results
