"""AnnData ``.h5ad`` slides with ``obsm['spatial']`` (scanpy/squidpy layout)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import SPATIAL_KEY
from .coords import replace_positions
from .registry import SlideFormat

if TYPE_CHECKING:
    from anndata import AnnData


def detect(path: Path) -> bool:
    return path.suffix.lower() == ".h5ad" and path.is_file()


def has_positions(path: Path) -> bool:
    """Whether the file stores ``obsm['spatial']`` (looks up one HDF5 key, reads no data)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "obsm" in f and SPATIAL_KEY in f["obsm"]
    except OSError:  # not HDF5 (or unreadable): not a slide we can open
        return False


def read(
    path: Path, *, coords: Any = None, sep: str | None = None, **_other_options: Any
) -> AnnData:
    """Read the file; ``coords`` (if given) replace ``obsm['spatial']``."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    if coords is not None:
        replace_positions(adata, coords, sep, path.name)
    return adata


FORMAT = SlideFormat(
    name="h5ad",
    detect=detect,
    read=read,
    description="an .h5ad file with obsm['spatial']",
    has_positions=has_positions,
)
