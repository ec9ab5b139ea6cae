"""Checks of slides, single-cell references and signatures; raise actionable errors.

The one set of checks: :func:`validate_slide` / :func:`validate_reference` run them on the
user's objects, and :func:`napari_stlnmf.preprocess.build_reference` runs the same ones
(:func:`check_cell_type_key`, :func:`check_unique`, :func:`check_counts`,
:func:`check_cell_type_sizes`, :func:`validate_signature`) on what it builds from.
Nothing here modifies its input; sparse counts are checked through their stored values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import SPATIAL_KEY
from ..errors import (
    CellTypeKeyError,
    CoordinateError,
    DuplicateNamesError,
    EmptyCellTypeError,
    InvalidCountsError,
)
from ._util import examples
from .counts import COUNT_LAYERS, FoundCounts, find_counts

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "candidate_columns",
    "check_cell_type_key",
    "check_cell_type_sizes",
    "check_counts",
    "check_unique",
    "reference_counts",
    "slide_counts",
    "validate_reference",
    "validate_signature",
    "validate_slide",
]

# Bounds for a column to be offered as a cell-type annotation.
MIN_TYPES, MAX_TYPES = 2, 1000
_LIKELY_TYPE_COLUMNS = (
    "cell_type",
    "celltype",
    "cell_types",
    "cell_type_original",
    "celltype_major",
    "celltype_minor",
    "annotation",
    "cell_annotation",
    "labels",
    "label",
    "cluster",
    "clusters",
)


# --------------------------------------------------------------------------- #
# shared checks
# --------------------------------------------------------------------------- #


def check_unique(index: pd.Index, what: str, fix: str) -> None:
    """Raise DuplicateNamesError naming duplicated entries of ``index``; ``fix`` ends it."""
    if index.has_duplicates:
        dups = index[index.duplicated()].unique()
        raise DuplicateNamesError(
            f"{len(dups)} {what} occur more than once, e.g. {examples(dups)}. {fix}"
        )


def _bad_positions(X: Any, mask_fn: Callable) -> tuple[int, np.ndarray, np.ndarray]:
    """Count entries where ``mask_fn`` is true; return (count, rows, cols) of the hits.

    For sparse input only the stored values are inspected, so nothing is densified.
    """
    if sparse.issparse(X):
        coo = sparse.coo_matrix(X)
        mask = mask_fn(coo.data)
        return int(mask.sum()), coo.row[mask], coo.col[mask]
    arr = np.asarray(X)
    mask = mask_fn(arr)
    rows, cols = np.nonzero(mask)
    return len(rows), rows, cols


def _values(X: Any) -> np.ndarray:
    """Stored values of a sparse or dense matrix (no copy for CSR/CSC/dense)."""
    return X.data if sparse.issparse(X) else np.asarray(X)


def check_counts(
    X: Any,
    row_names: pd.Index | None,
    col_names: pd.Index | None,
    what: str,
    units: tuple[str, str] = ("spot", "gene"),
) -> None:
    """Raise InvalidCountsError on non-numeric, non-finite or negative entries.

    ``units`` names the rows and columns in the message; rows or columns without names
    (None) are named by position.
    """
    if X is None:
        raise InvalidCountsError(f"The {what} has no counts: X is None.")
    vals = _values(X)
    if not (np.issubdtype(vals.dtype, np.number) or vals.dtype == bool):
        raise InvalidCountsError(
            f"The {what} counts have dtype {vals.dtype}; expected numbers. "
            "Convert with `adata.X = adata.X.astype('float32')`."
        )
    checks = []
    if np.issubdtype(vals.dtype, np.inexact):  # integers cannot be NaN/inf
        checks.append(
            (
                lambda a: ~np.isfinite(a),
                "NaN or infinite",
                "Counts must be finite; replace missing values by 0 or drop the affected rows.",
            )
        )
    if not (np.issubdtype(vals.dtype, np.unsignedinteger) or vals.dtype == bool):
        checks.append(
            (
                lambda a: a < 0,
                "negative",
                (
                    "Raw (non-negative) counts or mean expression are required; scaled data "
                    "(e.g. after sc.pp.scale) cannot be used. Use the raw counts, e.g. from "
                    "adata.layers['counts'] or adata.raw."
                ),
            )
        )
    for mask_fn, label, hint in checks:
        if not mask_fn(vals).any():
            continue
        n, rows, cols = _bad_positions(X, mask_fn)
        n_rows, n_cols = X.shape
        bad_rows = (pd.RangeIndex(n_rows) if row_names is None else row_names)[np.unique(rows)]
        bad_cols = (pd.RangeIndex(n_cols) if col_names is None else col_names)[np.unique(cols)]
        raise InvalidCountsError(
            f"The {what} has {n} {label} value(s) in {len(bad_rows)} {units[0]}(s) "
            f"(e.g. {examples(bad_rows)}) and {len(bad_cols)} {units[1]}(s) "
            f"(e.g. {examples(bad_cols)}). {hint}"
        )


def candidate_columns(obs: pd.DataFrame) -> list[str]:
    """Categorical/string obs columns with 2..1000 distinct values, likely names first."""
    found = []
    for col in obs.columns:
        s = obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            n = s.cat.remove_unused_categories().cat.categories.size
        elif pd.api.types.is_string_dtype(s.dtype) or s.dtype == object:
            n = s.dropna().nunique()
        else:
            continue
        if MIN_TYPES <= n <= MAX_TYPES:
            found.append(str(col))
    likely = [c for c in found if c.lower() in _LIKELY_TYPE_COLUMNS]
    return likely + [c for c in found if c not in likely]


def check_cell_type_key(obs: pd.DataFrame, key: str | None, source: str = "the reference") -> None:
    """Raise CellTypeKeyError, listing likely columns, unless ``key`` is a column of ``obs``."""
    if key is not None and key in obs.columns:
        return
    head = "No cell_type_key given" if key is None else f"Column {key!r} is not in obs of {source}"
    raise CellTypeKeyError(
        f"{head}: choose the obs column holding the cell types. Likely candidates: "
        f"{examples(candidate_columns(obs), 20) or 'none'}; all obs columns: "
        f"{examples(obs.columns, 30) or 'none'}."
    )


def check_cell_type_sizes(sizes: pd.Series, key: str, min_cells: int, obs: pd.DataFrame) -> None:
    """Check the number of cells per type (``sizes``, indexed by type) of ``obs[key]``.

    Raises CellTypeKeyError for fewer than two types with cells, EmptyCellTypeError for
    types with fewer than ``min_cells`` cells.
    """
    n_types = int((sizes > 0).sum())
    if n_types < MIN_TYPES:
        raise CellTypeKeyError(
            f"obs[{key!r}] holds {n_types} cell type(s); at least {MIN_TYPES} are "
            "needed. Likely cell-type columns: "
            f"{examples(candidate_columns(obs), 20) or 'none'}."
        )
    small = sizes[sizes < min_cells]
    if len(small):
        listed = ", ".join(f"{name!r} ({n})" for name, n in small.head(20).items())
        hint = (
            " Zero-cell types are usually unused categories left after subsetting: "
            f"`reference.obs[{key!r}] = "
            f"reference.obs[{key!r}].cat.remove_unused_categories()`."
            if (small == 0).any()
            else ""
        )
        raise EmptyCellTypeError(
            f"{len(small)} cell type(s) in obs[{key!r}] have fewer than {min_cells} "
            f"cell(s): {listed}. Remove or merge them.{hint}"
        )


SLIDE_NON_INTEGER_WAY_OUT = {
    "non_integer": "If they are counts on a linear scale that are not whole (expected counts "
    "from Salmon/alevin, ambient-corrected counts), pass allow_non_integer_slide=True."
}
REFERENCE_MEANS_WAY_OUT = {
    kind: "If the reference holds mean expression rather than counts per cell (pseudo-bulks, "
    "metacells, expected or ambient-corrected counts), pass reference_is_means=True."
    for kind in ("non_integer", "fixed_total")
}


def slide_counts(adata: AnnData, *, allow_non_integer: bool = False) -> FoundCounts:
    """The raw counts of a slide (:func:`napari_stlnmf.io.counts.find_counts`'s rule)."""
    return find_counts(
        adata, "slide", allow_non_integer=allow_non_integer, way_out=SLIDE_NON_INTEGER_WAY_OUT
    )


def reference_counts(reference: AnnData, *, is_means: bool = False) -> FoundCounts:
    """The counts of a single-cell reference, found as the slide's are
    (:func:`napari_stlnmf.io.counts.find_counts`); with ``is_means`` (the rows are mean
    expression, e.g. pseudo-bulks) a counts layer if there is one, else ``X``, as they are."""
    if not is_means:
        return find_counts(reference, "reference", way_out=REFERENCE_MEANS_WAY_OUT)
    for name in COUNT_LAYERS:
        if name in reference.layers:
            return FoundCounts(reference.layers[name], reference.var, f"layers['{name}']", "means")
    return FoundCounts(reference.X, reference.var, "X", "means")


# --------------------------------------------------------------------------- #
# slides
# --------------------------------------------------------------------------- #


def validate_slide(
    adata: AnnData, *, coords_key: str = SPATIAL_KEY, allow_non_integer: bool = False
) -> FoundCounts:
    """Check that a slide can be deconvolved; raise an actionable error otherwise.

    Finds the raw counts (``layers['counts']``, else ``X``, else ``.raw.X``:
    :func:`slide_counts`) and checks unique spot and gene names, finite non-negative counts
    with at least one non-zero entry, and finite (x, y) coordinates in ``obsm[coords_key]``.
    Sparse counts are checked through their stored values only. ``adata`` is not
    modified.

    Parameters
    ----------
    adata
        Spots x genes.
    coords_key
        ``obsm`` key of the spot coordinates.
    allow_non_integer
        Accept counts that are not whole numbers (but on a linear scale, not normalised).

    Returns
    -------
    The counts found (:class:`~napari_stlnmf.io.counts.FoundCounts`: matrix, genes, source).

    Raises
    ------
    DuplicateNamesError
        Duplicate barcodes or gene names.
    InvalidCountsError
        Non-numeric, NaN/infinite or negative counts, or no counts at all;
        :class:`~napari_stlnmf.errors.NotRawCountsError` (a subclass) for log-transformed,
        normalised or non-integer values with no raw counts elsewhere in the AnnData.
    CoordinateError
        Coordinates missing, of the wrong shape or non-finite.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidCountsError(
            f"The slide is empty ({adata.n_obs} spots x {adata.n_vars} genes)."
        )
    check_unique(
        adata.obs_names,
        "spot barcode(s)",
        "Spot names must be unique; run `adata.obs_names_make_unique()` "
        "(or check whether two slides were concatenated without a batch key).",
    )
    found = slide_counts(adata, allow_non_integer=allow_non_integer)
    check_unique(
        found.genes,
        "gene name(s)",
        "Gene names must be unique; run `adata.var_names_make_unique()` or sum the "
        "duplicated genes.",
    )
    check_counts(found.matrix, adata.obs_names, found.genes, "slide")
    if not np.any(_values(found.matrix)):
        raise InvalidCountsError(
            f"All {adata.n_obs} spots have zero counts in {found.source}; it looks empty. "
            "Check that the counts were loaded (into X, layers['counts'] or .raw)."
        )

    if coords_key not in adata.obsm:
        raise CoordinateError(
            f"No spot coordinates: obsm[{coords_key!r}] is missing. It must hold an "
            "(n_spots, 2) array of (x, y) spot centres; available obsm keys: "
            f"{examples(adata.obsm.keys(), 20) or 'none'}."
        )
    try:
        xy = np.asarray(adata.obsm[coords_key], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CoordinateError(f"obsm[{coords_key!r}] is not numeric: {err}") from err
    if xy.ndim != 2 or xy.shape[0] != adata.n_obs or xy.shape[1] < 2:
        raise CoordinateError(
            f"obsm[{coords_key!r}] has shape {xy.shape}; expected ({adata.n_obs}, 2) "
            "holding (x, y) per spot."
        )
    bad = ~np.all(np.isfinite(xy[:, :2]), axis=1)
    if bad.any():
        raise CoordinateError(
            f"{int(bad.sum())} of {adata.n_obs} spots have NaN or infinite coordinates in "
            f"obsm[{coords_key!r}], e.g. {examples(adata.obs_names[bad])}. "
            "Drop these spots or fix their positions."
        )
    return found


# --------------------------------------------------------------------------- #
# references
# --------------------------------------------------------------------------- #


def validate_reference(
    reference: AnnData | pd.DataFrame,
    *,
    cell_type_key: str | None = None,
    min_cells: int = 1,
    is_means: bool = False,
) -> None:
    """Check a single-cell reference or a signature table; raise an actionable error.

    ``reference`` is not modified.

    Parameters
    ----------
    reference
        Either an :class:`~anndata.AnnData` of cells x genes with raw counts in
        ``layers['counts']``, ``X`` or ``.raw`` (:func:`reference_counts`) and cell types in
        ``obs[cell_type_key]``, or a :class:`~pandas.DataFrame` signature of genes x cell
        types.
    cell_type_key
        ``obs`` column with the cell types (AnnData only, required there).
    min_cells
        Minimum number of cells per type (AnnData only).
    is_means
        The AnnData's rows are mean expression, not raw counts per cell: non-integer and
        normalised values are accepted (a signature table always is).

    Raises
    ------
    CellTypeKeyError
        ``cell_type_key`` missing, not in ``obs``, or with fewer than two types.
    EmptyCellTypeError
        A type has fewer than ``min_cells`` cells, or a signature column sums to 0.
    InvalidCountsError
        NaN/infinite or negative values.
    DuplicateNamesError
        Duplicate gene names (or duplicate cell-type columns of a signature).
    """
    import anndata as ad

    if isinstance(reference, ad.AnnData):
        _validate_sc_reference(
            reference, cell_type_key=cell_type_key, min_cells=min_cells, is_means=is_means
        )
    elif isinstance(reference, pd.DataFrame):
        validate_signature(reference)
    else:
        raise TypeError(
            f"reference must be an AnnData or a pandas DataFrame, got {type(reference).__name__}."
        )


def _validate_sc_reference(
    adata: AnnData, *, cell_type_key: str | None, min_cells: int, is_means: bool = False
) -> None:
    check_cell_type_key(adata.obs, cell_type_key)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidCountsError(
            f"The reference is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
        )
    found = reference_counts(adata, is_means=is_means)
    check_unique(
        found.genes,
        "gene name(s)",
        "Gene names must be unique; run `reference.var_names_make_unique()`.",
    )
    # value_counts keeps unused categories (count 0), so the message can name them
    sizes = adata.obs[cell_type_key].value_counts(dropna=True)
    check_cell_type_sizes(sizes, cell_type_key, min_cells, adata.obs)
    check_counts(found.matrix, adata.obs_names, found.genes, "reference", ("cell", "gene"))


def validate_signature(sig: pd.DataFrame) -> None:
    """Check a signature table (genes x cell types of mean expression)."""
    if sig.shape[0] == 0 or sig.shape[1] == 0:
        raise InvalidCountsError(
            f"The signature is empty ({sig.shape[0]} genes x {sig.shape[1]} cell types)."
        )
    bad = [c for c in sig.columns if not pd.api.types.is_numeric_dtype(sig[c])]
    if bad:
        raise InvalidCountsError(
            f"Signature column(s) {examples(bad)} are not numeric; a signature holds one "
            "numeric column of mean expression per cell type, gene names as index."
        )
    genes = pd.Index(sig.index.astype(str))
    types = pd.Index(sig.columns.astype(str))
    check_unique(
        genes,
        "gene name(s)",
        "Gene names (signature rows) must be unique; sum or drop duplicated genes.",
    )
    check_unique(types, "cell type name(s)", "Cell-type columns of the signature must be unique.")
    values = sig.to_numpy(dtype=np.float64)
    check_counts(values, genes, types, "signature", ("gene", "cell type"))
    zero = sig.columns[values.sum(axis=0) <= 0]
    if len(zero):
        raise EmptyCellTypeError(
            f"{len(zero)} cell type(s) have no expression in the signature (column sums to 0): "
            f"{examples(zero)}. Remove these columns."
        )
