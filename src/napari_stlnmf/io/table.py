"""Counts tables (spots x genes ``.csv``/``.tsv``/``.txt``, optionally gzipped) plus ``coords=``.

The table holds no positions, so it is read only together with ``coords=`` and, optionally,
a tissue ``image=`` with its ``scalefactor=``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY
from ..errors import CoordinateError
from ._util import examples, read_table, require_numeric, stem, table_suffix
from .coords import read_coords
from .images import read_image, to_uint8_rgb
from .library import estimate_spot_diameter
from .registry import SlideFormat

if TYPE_CHECKING:
    from anndata import AnnData


def _align_counts(
    counts: pd.DataFrame, coords: pd.DataFrame | np.ndarray, path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Put counts and coordinates in the same spot order (transposing counts if needed)."""
    # stacklevel 4 points at the caller of read_slide (read_slide -> read -> here)
    if isinstance(coords, np.ndarray):
        if len(coords) != counts.shape[0] and len(coords) == counts.shape[1]:
            warnings.warn(
                f"{path.name}: {counts.shape[1]} columns match the {len(coords)} coordinates, "
                "so the table was read as genes x spots and transposed.",
                UserWarning,
                stacklevel=4,
            )
            counts = counts.T
        if len(coords) != counts.shape[0]:
            raise CoordinateError(
                f"coords has {len(coords)} rows but the counts table has {counts.shape[0]} "
                "spots; pass one (x, y) row per spot, in table order."
            )
        return counts, pd.DataFrame(coords, index=counts.index, columns=["x", "y"])

    in_rows = counts.index.isin(coords.index)
    if not in_rows.all():
        in_cols = counts.columns.isin(coords.index)
        if len(counts.columns) and in_cols.all() and not in_rows.any():
            warnings.warn(
                f"{path.name}: the column names, not the row ids, match the spot ids in coords, "
                "so the table was read as genes x spots and transposed.",
                UserWarning,
                stacklevel=4,
            )
            counts = counts.T
        else:
            missing = counts.index[~in_rows]
            raise CoordinateError(
                f"{len(missing)} of {counts.shape[0]} spots in {path.name} have no coordinates, "
                f"e.g. {examples(missing)}; coords ids look like {examples(coords.index)}. "
                "The first column of both files must hold the same spot ids."
            )
    return counts, coords.loc[counts.index]


def detect(path: Path) -> bool:
    return table_suffix(path) is not None and path.is_file()


def read(
    path: Path,
    *,
    coords: Any = None,
    image: Any = None,
    scalefactor: float = 1.0,
    spot_diameter: float | None = None,
    library_id: str | None = None,
    sep: str | None = None,
    **_other_options: Any,
) -> AnnData:
    """Read a counts table with its spot positions ``coords`` and optional tissue ``image``."""
    import anndata as ad
    from scipy import sparse

    if coords is None:
        raise CoordinateError(
            f"A counts table ({path.name}) has no spot positions: pass coords= (a CSV with the "
            "spot id first and columns x, y; a DataFrame; or an (n_spots, 2) array)."
        )
    counts = read_table(path, sep)
    xy = read_coords(coords, sep)
    counts, xy = _align_counts(counts, xy, path)
    require_numeric(counts, path, "Counts table")

    obs = xy.drop(columns=["x", "y"]).copy()
    obs.index.name = None
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=obs,
        var=pd.DataFrame(index=counts.columns.copy()),
    )
    adata.obsm[SPATIAL_KEY] = xy[["x", "y"]].to_numpy(dtype=np.float64)

    if spot_diameter is None:
        spot_diameter = estimate_spot_diameter(adata.obsm[SPATIAL_KEY])
    scalefactors: dict[str, Any] = {}
    if spot_diameter is not None:
        scalefactors["spot_diameter_fullres"] = float(spot_diameter)
    images = {}
    metadata: dict[str, Any] = {}
    if image is not None:
        if isinstance(image, (str, Path)):
            images["hires"] = read_image(Path(image))
            metadata["source_image_path"] = str(image)
        else:
            images["hires"] = to_uint8_rgb(np.array(image))
        scalefactors["tissue_hires_scalef"] = float(scalefactor)
    if library_id is None:
        library_id = stem(path)
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }
    return adata


FORMAT = SlideFormat(
    name="table",
    detect=detect,
    read=read,
    description=(
        "a counts table (.csv, .tsv, .txt, optionally .gz; spots x genes, spot ids "
        "in the first column) together with coords="
    ),
    has_positions=lambda path: False,  # the positions come from coords=
    options=frozenset({"coords", "image", "scalefactor", "spot_diameter", "sep"}),
)
