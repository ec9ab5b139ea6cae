"""Cell-type references: single-cell ``.h5ad`` files and signature tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import FileFormatError
from ._util import read_table, require_numeric, table_suffix
from .counts import COUNT_LAYERS, describe_values, subsample_per_type
from .h5ad import require_hdf5
from .validate import candidate_columns, check_cell_type_key

if TYPE_CHECKING:
    from anndata import AnnData

# uns key of a reference read for a sample of its cells: how many cells the file holds
N_CELLS_IN_FILE = "stlnmf_n_cells_in_file"


def read_reference(
    path: str | Path,
    *,
    cell_type_key: str | None = None,
    max_cells_per_type: int | None = None,
    seed: int = 0,
) -> AnnData | pd.DataFrame:
    """Read a cell-type reference.

    Parameters
    ----------
    path
        An ``.h5ad`` single-cell reference (cells x genes, raw counts in ``layers['counts']``,
        ``X`` or ``.raw``), or a signature table (``.csv``, ``.tsv``, ``.txt``, optionally
        gzipped) with genes as rows, cell types as columns and gene names in the first column.
    cell_type_key
        For ``.h5ad`` input, the ``obs`` column holding the cell types; checked
        to exist when given.
    max_cells_per_type
        For ``.h5ad`` input with ``cell_type_key``: read only a seeded sample of at most this
        many cells per type (:func:`~napari_stlnmf.io.counts.subsample_per_type`, the same
        cells :func:`~napari_stlnmf.preprocess.build_reference` keeps in memory), straight
        from the file: ``obs`` first, then only those rows of the counts (a counts layer if
        there is one, else ``X``, and ``.raw`` only when ``X`` holds no raw counts). Memory
        grows with the cells kept, not with the file. None reads everything.
    seed
        Seed of that sample.

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

        if cell_type_key is not None and max_cells_per_type is not None:
            obs = _read_obs(path)
            check_cell_type_key(obs, cell_type_key, path.name)
            rows = subsample_per_type(obs[cell_type_key], max_cells_per_type, seed)
            subset = _read_h5ad_rows(path, obs, rows)
            if subset is not None:
                return subset
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


def _read_elem_functions():
    try:
        from anndata.io import read_elem, sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem, sparse_dataset
    return read_elem, sparse_dataset


def _rows_of(element, rows: np.ndarray):
    """Rows ``rows`` (sorted, unique) of a stored matrix, reading only those rows where the
    layout allows it (CSR groups, dense datasets)."""
    import h5py

    read_elem, sparse_dataset = _read_elem_functions()
    if isinstance(element, h5py.Dataset):
        return element[rows] if rows.size < element.shape[0] else element[()]
    if element.attrs.get("encoding-type") == "csr_matrix":
        return sparse_dataset(element)[rows]
    return read_elem(element)[rows]  # CSC: rows are spread over the whole file


def _read_h5ad_rows(path: Path, obs: pd.DataFrame, rows: np.ndarray) -> AnnData | None:
    """An in-memory AnnData of the cells ``rows`` of an .h5ad file: ``obs``, ``var`` and the
    counts by :func:`~napari_stlnmf.io.counts.find_counts`'s rule, reading each matrix's kept
    rows only (a counts layer alone if there is one; ``.raw`` only if ``X`` holds no raw
    counts). None for layouts this cannot read (the caller reads the whole file)."""
    import anndata as ad
    import h5py

    read_elem, _ = _read_elem_functions()
    kept_obs = obs.iloc[rows]
    uns = {N_CELLS_IN_FILE: len(obs)}
    try:
        with h5py.File(path, "r") as f:
            var = read_elem(f["var"])
            layer = next((n for n in COUNT_LAYERS if "layers" in f and n in f["layers"]), None)
            if layer is not None:
                counts = _rows_of(f["layers"][layer], rows)
                return ad.AnnData(obs=kept_obs, var=var, layers={layer: counts}, uns=uns)
            X = _rows_of(f["X"], rows)
            adata = ad.AnnData(X=X, obs=kept_obs, var=var, uns=uns)
            if "raw" in f and describe_values(X) != "counts":
                raw = ad.AnnData(
                    X=_rows_of(f["raw"]["X"], rows), obs=kept_obs, var=read_elem(f["raw"]["var"])
                )
                adata.raw = raw
            return adata
    # Legacy or unusual layouts fail in many ways (anndata's own error type is private); the
    # whole-file reader handles them or raises a proper error.
    except Exception:  # noqa: BLE001 -- any failure: fall back, see above
        return None


def _read_obs(path: Path) -> pd.DataFrame:
    """Read only ``obs`` of an .h5ad file (X and layers can be gigabytes)."""
    import anndata as ad
    import h5py

    try:
        read_elem, _ = _read_elem_functions()
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
