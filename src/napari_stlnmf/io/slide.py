"""``read_slide``: find the slide's format in the registry, read it, check the result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY
from ..checks import is_number
from ..errors import CoordinateError, FileFormatError, ImageMismatchError
from ._util import examples
from .registry import find_slide_format, slide_formats, supported_slides

if TYPE_CHECKING:
    from anndata import AnnData


def read_slide(
    path: str | Path,
    *,
    coords: str | Path | pd.DataFrame | np.ndarray | None = None,
    image: str | Path | np.ndarray | None = None,
    scalefactor: float = 1.0,
    spot_diameter: float | None = None,
    library_id: str | None = None,
    sep: str | None = None,
    bin_size: float | None = None,
) -> AnnData:
    """Read a spatial transcriptomics slide.

    Parameters
    ----------
    path
        One of (see :func:`~napari_stlnmf.io.slide_formats` for the registered formats)

        - an ``.h5ad`` file whose ``obsm['spatial']`` holds (x, y) spot centres;
        - a 10x Space Ranger ``outs`` folder (or the folder containing ``outs``)
          with ``filtered_feature_bc_matrix.h5`` and ``spatial/``;
        - a counts table (``.csv``, ``.tsv``, ``.txt``, optionally gzipped) with
          spots as rows, genes as columns and spot ids in the first column.
          ``coords`` is then required.
    coords
        Spot positions for a counts table (for an ``.h5ad`` file they replace
        ``obsm['spatial']``): a delimited file or :class:`~pandas.DataFrame` with
        spot ids as first column/index and columns ``x``, ``y`` (or
        ``pxl_col_in_fullres``, ``pxl_row_in_fullres``; or ``imagecol``,
        ``imagerow``), or an ``(n_spots, 2)`` array of (x, y) in table order.
        Other columns of a coords table are copied to ``obs``.
    image
        Tissue image for a counts table: path to a PNG/JPEG/TIFF file or an array.
        Stored as ``uns['spatial'][library_id]['images']['hires']``.
    scalefactor
        Image pixels per coordinate unit (stored as ``tissue_hires_scalef``).
    spot_diameter
        Spot diameter in coordinate units, for a counts table. Default:
        :func:`~napari_stlnmf.io.estimate_spot_diameter` (0.55 times the spot spacing,
        the Visium diameter/pitch ratio).
    library_id
        Key in ``uns['spatial']``. Default: the sample folder name for Space
        Ranger output, the file name without suffixes for a table.
    sep
        Delimiter of the counts and coords tables. Default: guessed from the header.
    bin_size
        Visium HD: the bins to read, in µm (a ``square_XXXum/`` folder must exist for it).
        Default: 8 µm, or the bins of the ``square_XXXum/`` folder given as ``path``.

    A keyword the file's format does not use (``image``, ``scalefactor`` or ``bin_size`` for an
    ``.h5ad``, ``coords`` for a Space Ranger folder, …) raises FileFormatError rather than being
    dropped.

    Returns
    -------
    A new :class:`~anndata.AnnData` with counts in ``X`` (float32 CSR for 10x and
    table input; as stored for ``.h5ad``), ``obsm['spatial']`` as (x, y) and the
    images/scale factors in ``uns['spatial'][library_id]``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FileFormatError
        ``path`` is none of the supported inputs or cannot be parsed.
    CoordinateError
        Spot positions are missing or do not match the spots.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist. Supported inputs: {supported_slides()}."
        )
    fmt = find_slide_format(path)
    if fmt is None:
        what = "is a folder that no slide format recognises" if path.is_dir() else "is no slide"
        raise FileFormatError(
            f"Cannot read {str(path)!r} as a slide: it {what}. "
            f"Supported inputs: {supported_slides()}."
        )
    options = {
        "coords": coords,
        "image": image,
        "scalefactor": scalefactor,
        "spot_diameter": spot_diameter,
        "sep": sep,
        "bin_size": bin_size,
    }
    _refuse_ignored_options(path, fmt, options)
    check_table_scales(scalefactor, spot_diameter)
    adata = fmt.read(path, library_id=library_id, **options)
    if SPATIAL_KEY not in adata.obsm:
        raise CoordinateError(
            f"{path.name} has no obsm[{SPATIAL_KEY!r}]; it must hold an (n_spots, 2) array "
            "of (x, y) spot centres in full-resolution image pixels. Available obsm keys: "
            f"{examples(adata.obsm.keys(), 20) or 'none'}. Set it with "
            "`adata.obsm['spatial'] = adata.obs[['x', 'y']].to_numpy()` or pass coords=."
        )
    return adata


# what each keyword is for, to say so when a format would drop it
_OPTION_PURPOSE = {
    "coords": "spot positions",
    "image": "a tissue image",
    "scalefactor": "the image's pixels per coordinate unit",
    "spot_diameter": "the spot size",
    "sep": "the delimiter",
    "bin_size": "the Visium HD bins to read",
}
_OPTION_DEFAULTS = {"scalefactor": 1.0}


def _refuse_ignored_options(path: Path, fmt, options: dict) -> None:
    """A keyword the file's format does not use is an error, never silently dropped."""
    if fmt.options is None:
        return
    given = [
        name
        for name, value in options.items()
        if value is not None and not _is_default(name, value) and name not in fmt.options
    ]
    if not given:
        return
    takers = " or ".join(
        f.description.split(" (")[0] for f in slide_formats() if f.options and given[0] in f.options
    )
    what = "; ".join(f"{name}= gives {_OPTION_PURPOSE.get(name, 'an option')}" for name in given)
    hint = (
        " (the file's own images in uns['spatial'] are used) or add the image to the "
        "AnnData's uns['spatial']"
        if "image" in given
        else ""
    )
    raise FileFormatError(
        f"{what} to {takers or 'another format'}; {path.name} is {fmt.description}, which "
        f"would ignore {'it' if len(given) == 1 else 'them'}. Drop "
        f"{', '.join(name + '=' for name in given)}{hint}."
    )


def _is_default(name: str, value) -> bool:
    default = _OPTION_DEFAULTS.get(name)
    try:
        return default is not None and bool(value == default)
    except (TypeError, ValueError):  # arrays compare elementwise
        return False


def check_table_scales(scalefactor, spot_diameter) -> None:
    """``scalefactor`` and ``spot_diameter`` must be positive finite numbers."""
    for name, value, unit in (
        ("scalefactor", scalefactor, "image pixels per coordinate unit"),
        ("spot_diameter", spot_diameter, "coordinate units"),
    ):
        if value is None and name == "spot_diameter":
            continue
        if not (is_number(value) and math.isfinite(value) and value > 0):
            raise ImageMismatchError(f"{name} must be a positive number of {unit}, got {value!r}.")
