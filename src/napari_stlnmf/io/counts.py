"""Where an AnnData keeps its raw counts, and whether values look like raw counts at all.

One rule for slides and single-cell references alike (:func:`find_counts`):

1. a counts layer (``layers['counts']``, ``'raw_counts'`` or ``'umi_counts'``, the names
   scanpy/scvi-tools tutorials store raw counts under) if there is one: it is named as counts,
   so it is used, and refused if it does not hold counts;
2. else ``X`` if it holds raw counts;
3. else ``.raw.X`` (with ``.raw.var_names``) if it holds raw counts;
4. else, with non-integer values allowed, the first of ``X``, ``.raw.X`` on a linear scale;
5. else :class:`~napari_stlnmf.errors.NotRawCountsError` saying what ``X`` holds and where to
   put the counts.

What values look like (:func:`describe_values`, on a seeded sample of rows): ``'counts'``
(whole numbers), ``'log'`` (not whole, largest value below :data:`LOG_MAX`: log1p of counts,
normalised or not, is at most ~14 even for CPM), ``'fixed_total'`` (not whole, every row
summing to the same total: ``normalize_total``/CPM without the log), ``'scaled'`` (negative
values: ``sc.pp.scale``), ``'invalid'`` (NaN/inf, non-numeric) and ``'non_integer'`` (linear,
not whole: expected counts from Salmon/alevin, ambient-corrected counts, means). Nothing here
modifies or copies the user's object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import NotRawCountsError, StlnmfError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "COUNT_LAYERS",
    "LOG_MAX",
    "FoundCounts",
    "describe_values",
    "find_counts",
    "subsample_per_type",
]

COUNT_LAYERS = ("counts", "raw_counts", "umi_counts")
LOG_MAX = 30.0  # log1p(CPM) <= 14, log2(CPM + 1) <= 20; raw counts of 1000+ rows go far above
SAMPLE_ROWS = 2000  # rows whose values decide what a matrix holds
FIXED_TOTAL_SPREAD = 1e-3  # relative spread of row sums below which they were normalised
WHOLE_TOLERANCE = 1e-3  # float32 holds counts exactly; this allows values written as text

_DESCRIPTIONS = {
    "log": "log-transformed (e.g. sc.pp.log1p after normalize_total)",
    "fixed_total": "normalised to the same total per row (e.g. sc.pp.normalize_total or CPM)",
    "scaled": "scaled (negative values, e.g. after sc.pp.scale)",
    "non_integer": "not whole numbers",
    "invalid": "not finite numbers",
}

# NaN, inf, text or negative values: returned as found, so that check_counts (io.validate)
# raises its message naming the offending spots/cells and genes
_NAMED_BY_CHECK_COUNTS = ("invalid", "scaled")


@dataclass(frozen=True)
class FoundCounts:
    """A matrix of counts found in an AnnData, its genes and where it was found.

    ``matrix`` is the user's stored matrix itself (not a copy): read it, never write it.
    ``var`` is the gene table belonging to it (``adata.var``, or ``adata.raw.var`` for
    ``source == 'raw.X'``). ``kind`` is what :func:`describe_values` found."""

    matrix: Any
    var: pd.DataFrame
    source: str
    kind: str

    @property
    def genes(self) -> pd.Index:
        return pd.Index(self.var.index.astype(str))


def _sample_rows(n_rows: int, at_most: int = SAMPLE_ROWS, seed: int = 0) -> np.ndarray:
    if n_rows <= at_most:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, at_most, replace=False))


def describe_values(matrix) -> str:
    """What ``matrix`` holds, from a seeded sample of its rows (see the module's docstring)."""
    if matrix is None or len(getattr(matrix, "shape", ())) != 2:
        return "invalid"
    rows = _sample_rows(matrix.shape[0])
    part = matrix[rows] if rows.size < matrix.shape[0] else matrix
    part = sparse.csr_matrix(part) if sparse.issparse(part) else np.asarray(part)
    values = part.data if sparse.issparse(part) else part.ravel()
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        return "invalid"
    if values.size and np.issubdtype(values.dtype, np.signedinteger) and values.min() < 0:
        return "scaled"
    if not np.issubdtype(values.dtype, np.inexact) or values.size == 0:
        return "counts"  # integers (or nothing stored)
    if not np.all(np.isfinite(values)):
        return "invalid"
    if values.min() < 0:
        return "scaled"
    if np.all(np.abs(values - np.round(values)) < WHOLE_TOLERANCE):
        return "counts"
    sums = np.asarray(part.sum(1), dtype=np.float64).ravel()
    sums = sums[sums > 0]
    if sums.size >= 2 and np.std(sums) <= FIXED_TOTAL_SPREAD * np.mean(sums):
        return "fixed_total"
    if values.max() < LOG_MAX:
        return "log"
    return "non_integer"


def _refusal(what: str, kind: str, where: str, adata: AnnData, way_out: dict[str, str]) -> str:
    """The message of a refusal: what was found, where the counts could be, the way out."""
    layers = list(adata.layers.keys())
    raw = "a .raw that holds no raw counts either" if adata.raw is not None else "no .raw"
    return (
        f"The {what}'s {where} holds values that are {_DESCRIPTIONS[kind]}, not raw counts. "
        "Pass the raw counts (whole numbers, before any normalisation) in layers['counts'] "
        "(`adata.layers['counts'] = raw_counts`), in X, or in .raw (`adata.raw = adata` before "
        f"normalising); this object has layers {layers or 'none'} and {raw}."
        + (f" {way_out[kind]}" if kind in way_out else "")
    )


def find_counts(
    adata: AnnData,
    what: str = "slide",
    *,
    allow_non_integer: bool = False,
    way_out: dict[str, str] | None = None,
) -> FoundCounts:
    """The raw counts of ``adata`` by the rule of this module; ``what`` names it in messages.

    ``allow_non_integer`` accepts linear values that are not whole numbers (never log-
    transformed, fixed-total or scaled ones); ``way_out`` maps a kind of values to the sentence
    ending its refusal (the option that accepts them). Raises
    :class:`~napari_stlnmf.errors.NotRawCountsError`."""
    way_out = way_out or {}
    for name in COUNT_LAYERS:
        if name in adata.layers:
            matrix = adata.layers[name]
            kind = describe_values(matrix)
            if kind == "counts" or (allow_non_integer and kind == "non_integer"):
                return FoundCounts(matrix, adata.var, f"layers['{name}']", kind)
            if kind in _NAMED_BY_CHECK_COUNTS:
                return FoundCounts(matrix, adata.var, f"layers['{name}']", kind)
            raise NotRawCountsError(_refusal(what, kind, f"layers[{name!r}]", adata, way_out))
    candidates = [("X", adata.X, adata.var)]
    if adata.raw is not None:
        candidates.append(("raw.X", adata.raw.X, adata.raw.var))
    kinds = [describe_values(matrix) for _, matrix, _ in candidates]
    accepted = ("counts", "non_integer") if allow_non_integer else ("counts",)
    for wanted in accepted:
        for (source, matrix, var), kind in zip(candidates, kinds):
            if kind == wanted:
                return FoundCounts(matrix, var, source, kind)
    if kinds[0] in _NAMED_BY_CHECK_COUNTS:
        return FoundCounts(adata.X, adata.var, "X", "invalid")
    raise NotRawCountsError(_refusal(what, kinds[0], "X", adata, way_out))


def subsample_per_type(
    labels: pd.Series | np.ndarray, max_cells_per_type: int | None, seed: int = 0
) -> np.ndarray:
    """Positions (sorted) of at most ``max_cells_per_type`` cells of each type, drawn with
    ``seed``; every cell without a label (NaN) is kept (the reference builder warns about
    them and drops them). Types at or under the cap keep every cell, so a cap above the
    largest type returns every position."""
    labels = pd.Series(np.asarray(labels, dtype=object))
    n = len(labels)
    if max_cells_per_type is None:
        return np.arange(n)
    if int(max_cells_per_type) < 1:
        raise StlnmfError(f"max_cells_per_type must be at least 1, not {max_cells_per_type!r}")
    cap = int(max_cells_per_type)
    rng = np.random.default_rng(seed)
    keep = [np.flatnonzero(labels.isna().to_numpy())]
    codes, uniques = pd.factorize(labels, sort=True)
    for t in range(len(uniques)):
        members = np.flatnonzero(codes == t)
        keep.append(members if members.size <= cap else rng.choice(members, cap, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64)
