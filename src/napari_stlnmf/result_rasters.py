"""Square bins (Visium HD) as the pixels of a grid: one image for any number of bins (pure:
numpy only, no Qt, no napari).

A bin is a pixel of its grid: :func:`bin_grid` gives every bin its integer (row, col) on the
grid and the 3 x 3 (row, col) affine from grid pixels to the bins' napari coordinates
(``obsm['spatial'][:, ::-1]``), fitted on all bins, so a slightly rotated array lies where it
is; :func:`raster` writes one value per bin into a float32 image (``fill`` elsewhere) and
:func:`index_raster` the bins' row numbers (-1 elsewhere) for hover look-ups. napari draws
such an image at the bins' true size and position with the affine as the layer's ``affine``
(pixel centres at integer data coordinates, as napari places them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BinGrid", "bin_grid", "index_raster", "raster"]

# a grid whose fitted positions miss the bins by more than this share of a bin is no grid
MAX_GRID_MISFIT = 0.25


@dataclass(frozen=True)
class BinGrid:
    """Where each bin lies on its grid: ``rows``/``cols`` (int, from 0), the grid's ``shape``
    and ``affine``, the 3 x 3 map from grid (row, col) to napari (row, col) coordinates."""

    rows: np.ndarray
    cols: np.ndarray
    shape: tuple[int, int]
    affine: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.rows.size)


def bin_grid(yx, bin_size: float, *, array_rows=None, array_cols=None) -> BinGrid | None:
    """Integer grid indices of square bins from their centres ``yx`` ((n, 2), napari (row,
    col)) and side ``bin_size`` (same units), and the grid-to-``yx`` affine.

    ``array_rows``/``array_cols`` (Space Ranger's ``array_row``/``array_col``) are used as the
    indices when given; otherwise the centres are rounded to multiples of ``bin_size`` from
    the lowest one. The affine is the least-squares fit of the centres on the indices. Returns
    None when the bins do not form such a grid (two bins on one pixel, or fitted centres more
    than a quarter of a bin off): such slides stay Points.
    """
    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    side = float(bin_size)
    if len(yx) == 0 or not np.isfinite(side) or side <= 0 or not np.isfinite(yx).all():
        return None
    if array_rows is not None and array_cols is not None:
        rows = np.asarray(array_rows, dtype=np.int64)
        cols = np.asarray(array_cols, dtype=np.int64)
    else:
        idx = np.rint((yx - yx.min(axis=0)) / side).astype(np.int64)
        rows, cols = idx[:, 0], idx[:, 1]
    rows, cols = rows - rows.min(), cols - cols.min()
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    flat = rows * shape[1] + cols
    if np.unique(flat).size != flat.size:
        return None
    design = np.column_stack([rows, cols, np.ones(len(rows))]).astype(np.float64)
    if len(yx) >= 3 and np.linalg.matrix_rank(design) == 3:
        coef, *_ = np.linalg.lstsq(design, yx, rcond=None)  # (3, 2): yx = design @ coef
        affine = np.eye(3)
        affine[:2, :] = coef.T
    else:  # one row or column of bins: the side gives the scale
        affine = np.array([[side, 0.0, 0.0], [0.0, side, 0.0], [0.0, 0.0, 1.0]])
        affine[:2, 2] = (yx - np.column_stack([rows, cols]) * side).mean(axis=0)
    fitted = design @ affine[:2, :].T
    if np.abs(fitted - yx).max() > MAX_GRID_MISFIT * side:
        return None
    return BinGrid(rows=rows, cols=cols, shape=shape, affine=affine)


def raster(grid: BinGrid, values, *, fill: float = np.nan, out=None) -> np.ndarray:
    """``values`` (one per bin) as a float32 image of ``grid.shape``, ``fill`` off the bins.
    ``out`` (a float32 array of that shape) is filled in place and returned."""
    values = np.asarray(values)
    if values.shape != (grid.n_bins,):
        raise ValueError(f"{values.shape} values for {grid.n_bins} bins")
    if out is None:
        out = np.full(grid.shape, fill, dtype=np.float32)
    else:
        out.fill(fill)
    out[grid.rows, grid.cols] = values
    return out


def index_raster(grid: BinGrid) -> np.ndarray:
    """Each pixel's bin (its row in the table), -1 off the bins; int32."""
    out = np.full(grid.shape, -1, dtype=np.int32)
    out[grid.rows, grid.cols] = np.arange(grid.n_bins, dtype=np.int32)
    return out
