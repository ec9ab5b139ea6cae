"""napari reader: every registered slide format whose files place the spots themselves.

Today: Space Ranger ``outs/`` folders (Visium, and Visium HD at the default 8 µm bins; the
widget's "open folder" with its bin size chooses another), ``.h5ad`` slides with
``obsm['spatial']`` and SpatialData ``.zarr`` stores (with ``napari-stlnmf[spatialdata]``; see
:mod:`napari_stlnmf.io.registry`). Opens the tissue image (scaled to full-resolution pixels; for
SpatialData, placed in the store's 'global' coordinate system like napari-spatialdata's layers)
and the spots as a Points layer (HD bins as squares); an ``.h5ad`` written by this plugin's
writer, or a store whose table holds results, also brings back the result layers.
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


def read_slide_layers(path, bin_size: float | None = None) -> list[tuple]:
    """Read a slide (and saved results, if any) as napari layer-data tuples; ``bin_size``: the
    Visium HD bins to read (µm, default 8)."""
    from .. import io

    if isinstance(path, (list, tuple)):
        path = path[0]
    p = Path(path)
    adata = io.read_slide(p, bin_size=bin_size)
    name = p.parent.name if p.name == "outs" else p.stem if p.is_file() else p.name
    bin_um = _bin_size_um(adata)
    if bin_um is not None:  # HD: the sample, whichever of its folders was opened
        name = f"{next(iter(adata.uns['spatial']))} {bin_um:g} µm"
    layers = slide_layers(adata, name=name, path=p)
    source = layers[-1][1]["metadata"]["stlnmf_slide"]["slide_id"]
    results = result_layers_from_adata(adata, source=source, slide_name=name)
    if results:  # saved results: hide the plain spots so the maps show
        layers[-1][1]["visible"] = False
    return layers + results


def _bin_size_um(adata) -> float | None:
    """The bin size of a Visium HD slide of one library, else None."""
    libraries = adata.uns.get("spatial") or {}
    if len(libraries) != 1:
        return None
    value = (next(iter(libraries.values())).get("scalefactors") or {}).get("bin_size_um")
    return None if value is None else float(value)
