"""Spot positions given by the user (``coords=``): a table, a DataFrame or an array."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY
from ..errors import CoordinateError, DuplicateNamesError
from ._util import examples, read_table
from .spaceranger import read_positions_csv

if TYPE_CHECKING:
    from anndata import AnnData

# (x, y) column pairs accepted in coordinate tables, in order of preference.
XY_COLUMNS = [
    ("x", "y"),
    ("pxl_col_in_fullres", "pxl_row_in_fullres"),
    ("imagecol", "imagerow"),
]


def _pick_xy(df: pd.DataFrame, source: str) -> tuple[str, str]:
    lower = {str(c).lower(): c for c in df.columns}
    for x, y in XY_COLUMNS:
        if x in lower and y in lower:
            return lower[x], lower[y]
    # two unnamed numeric columns are not guessed: which one is x (horizontal) is not known,
    # and a swap mirrors the slide and misplaces the spots on the image without a word
    accepted = ", ".join(f"{x}/{y}" for x, y in XY_COLUMNS)
    raise CoordinateError(
        f"Cannot find spot coordinates in {source}: expected columns {accepted}; "
        f"found {examples(df.columns, 10)}. Rename the two position columns to x "
        "(horizontal, image column) and y (vertical, image row)."
    )


def read_coords(coords: Any, sep: str | None) -> pd.DataFrame | np.ndarray:
    """Return coordinates as a DataFrame with 'x', 'y' first, or an (n, 2) array."""
    if isinstance(coords, (str, Path)):
        path = Path(coords)
        if not path.is_file():
            raise FileNotFoundError(f"Coordinates file {str(path)!r} does not exist.")
        if path.name.startswith("tissue_positions"):
            df = read_positions_csv(path)
        else:
            df = read_table(path, sep)
        source = repr(str(path))
    elif isinstance(coords, pd.DataFrame):
        df = coords.copy()
        df.index = df.index.astype(str)
        source = "the coords DataFrame"
    else:
        arr = np.array(coords, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise CoordinateError(
                f"coords array must have shape (n_spots, 2) holding (x, y); got {arr.shape}."
            )
        return arr[:, :2]
    xcol, ycol = _pick_xy(df, source)
    if df.index.has_duplicates:
        dups = df.index[df.index.duplicated()].unique()
        raise DuplicateNamesError(
            f"{source} lists {len(dups)} spot id(s) more than once, e.g. {examples(dups)}."
        )
    xy = df[[xcol, ycol]].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    xy.columns = ["x", "y"]
    extra = df.drop(columns=[xcol, ycol])
    return pd.concat([xy, extra], axis=1)


def replace_positions(adata: AnnData, coords: Any, sep: str | None, name: str) -> None:
    """Set ``obsm['spatial']`` of ``adata`` (read from file ``name``) from ``coords``."""
    xy = read_coords(coords, sep)
    if isinstance(xy, np.ndarray):
        if len(xy) != adata.n_obs:
            raise CoordinateError(f"coords has {len(xy)} rows but {name} has {adata.n_obs} spots.")
    else:
        missing = adata.obs_names[~adata.obs_names.isin(xy.index)]
        if len(missing):
            raise CoordinateError(
                f"{len(missing)} of {adata.n_obs} spots of {name} have no "
                f"coordinates, e.g. {examples(missing)}."
            )
        xy = xy.loc[adata.obs_names, ["x", "y"]].to_numpy(dtype=np.float64)
    adata.obsm[SPATIAL_KEY] = xy
