"""Cell-type references: single-cell ``.h5ad`` files and signature tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import FileFormatError
from ._util import read_table, require_numeric, table_suffix
from .h5ad import require_hdf5
from .validate import candidate_columns, check_cell_type_key

if TYPE_CHECKING:
    from anndata import AnnData


def read_reference(path: str | Path, *, cell_type_key: str | None = None) -> AnnData | pd.DataFrame:
    """Read a cell-type reference.

    Parameters
    ----------
    path
        An ``.h5ad`` single-cell reference (cells x genes, counts in ``X``), or a
        signature table (``.csv``, ``.tsv``, ``.txt``, optionally gzipped) with
        genes as rows, cell types as columns and gene names in the first column.
    cell_type_key
        For ``.h5ad`` input, the ``obs`` column holding the cell types; checked
        to exist when given.

    Returns
    -------
    A new :class:`~anndata.AnnData` (``.h5ad``) or a float
    :class:`~pandas.DataFrame` of genes x cell types (table).

    Raises
    ------
    CellTypeKeyError
        ``cell_type_key`` is not an ``obs`` column.
    FileFormatError
        Unsupported file type or non-numeric signature table.
    """
    path = Path(path)
    require_reference_file(path)
    if path.suffix.lower() == ".h5ad":
        import anndata as ad

        adata = ad.read_h5ad(path)
        if cell_type_key is not None:
            check_cell_type_key(adata.obs, cell_type_key, path.name)
        return adata
    if table_suffix(path) is not None:
        sig = read_table(path, None)
        require_numeric(sig, path, "Signature table")
        sig = sig.astype(np.float64)
        sig.index.name = None
        return sig
    raise FileFormatError(
        f"Cannot read {str(path)!r} as a reference. Supported: an .h5ad single-cell reference "
        "(cells x genes with a cell-type obs column) or a signature table (.csv/.tsv/.txt, "
        "optionally .gz; genes x cell types, gene names in the first column)."
    )


def require_reference_file(path: Path) -> None:
    """A reference path must be a file (a folder is named as one, not "does not exist"), and an
    ``.h5ad`` one must open as HDF5."""
    if path.is_dir():
        raise FileFormatError(
            f"Reference {str(path)!r} is a folder; give the reference file itself: an .h5ad "
            "single-cell reference or a signature table (.csv/.tsv/.txt, genes x cell types)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Reference file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".h5ad":
        require_hdf5(path, "reference")


def _read_obs(path: Path) -> pd.DataFrame:
    """Read only ``obs`` of an .h5ad file (X and layers can be gigabytes)."""
    import anndata as ad
    import h5py

    try:
        try:
            from anndata.io import read_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem
        with h5py.File(path, "r") as f:
            return read_elem(f["obs"])
    # Legacy or unusual layouts make read_elem fail in many ways (its own error type is
    # private to anndata); the full reader below handles them or raises a proper error.
    except Exception:  # noqa: BLE001 -- any read_elem failure: fall back, see above
        backed = ad.read_h5ad(path, backed="r")
        try:
            return backed.obs.copy()
        finally:
            backed.file.close()


def reference_columns(path: str | Path) -> list[str]:
    """List the ``obs`` columns of an .h5ad reference that could hold cell types.

    Only ``obs`` is read. Candidates are categorical or string columns with
    2 to 1000 distinct values; common names such as ``cell_type`` come first.

    Parameters
    ----------
    path
        An ``.h5ad`` reference, or a signature table.

    Returns
    -------
    Column names; ``[]`` for a signature table (its columns are the types).
    """
    path = Path(path)
    require_reference_file(path)
    if path.suffix.lower() == ".h5ad":
        return candidate_columns(_read_obs(path))
    if table_suffix(path) is not None:
        return []
    raise FileFormatError(
        f"Cannot read {str(path)!r} as a reference: expected .h5ad or a .csv/.tsv/.txt "
        "signature table."
    )
