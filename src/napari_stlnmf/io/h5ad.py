"""AnnData ``.h5ad`` slides with ``obsm['spatial']`` (scanpy/squidpy layout)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import SPATIAL_KEY
from ..errors import FileFormatError
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


def require_hdf5(path: Path, what: str) -> None:
    """Raise FileFormatError unless ``path`` opens as an HDF5 file (an ``.h5ad`` that is
    truncated, empty, or another format renamed fails here, not deep inside anndata)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
    except OSError as err:
        raise FileFormatError(
            f"Cannot read {str(path)!r} as the {what}: it is not a readable .h5ad (HDF5) file "
            f"({err}). The file may be truncated by an interrupted copy or download, or be "
            "another format renamed to .h5ad: copy it again, or re-save it with "
            "`adata.write_h5ad(path)`."
        ) from err
    if not {"obs", "var"} <= set(keys):  # every AnnData has both; a 10x .h5 has 'matrix'
        raise FileFormatError(
            f"Cannot read {str(path)!r} as the {what}: it is HDF5 but not an AnnData .h5ad "
            f"(no obs and var groups; it holds {', '.join(keys[:10]) or 'nothing'}). A 10x "
            "matrix .h5 is read from its Space Ranger outs/ folder; another HDF5 file must be "
            "converted to AnnData first (anndata.AnnData(X=..., obs=..., var=...).write_h5ad)."
        )


def read_h5ad_file(path: Path, what: str) -> AnnData:
    """``anndata.read_h5ad`` with unreadable files reported as FileFormatError."""
    import anndata as ad

    require_hdf5(path, what)
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, TypeError, ValueError) as err:  # AnnData groups, but broken
        raise FileFormatError(
            f"Cannot read {str(path)!r} as the {what}: it is HDF5 but not an AnnData .h5ad "
            f"({type(err).__name__}: {err}). A 10x matrix .h5 is read from its Space Ranger "
            "outs/ folder."
        ) from err


def read(
    path: Path, *, coords: Any = None, sep: str | None = None, **_other_options: Any
) -> AnnData:
    """Read the file; ``coords`` (if given) replace ``obsm['spatial']``."""
    adata = read_h5ad_file(path, "slide")
    if coords is not None:
        replace_positions(adata, coords, sep, path.name)
    return adata


FORMAT = SlideFormat(
    name="h5ad",
    detect=detect,
    read=read,
    description="an .h5ad file with obsm['spatial']",
    has_positions=has_positions,
    options=frozenset({"coords", "sep"}),
)
