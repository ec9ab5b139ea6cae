"""A slide's libraries in ``uns['spatial']``: tissue image, scale factors and spot size.

The one place that looks images up by library (:func:`get_image`) and that decides the
spot diameter (:func:`spot_diameter`); the napari layers, the PNG maps and the image
features of the graph all ask here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._constants import SPATIAL_KEY
from ..errors import CoordinateError, ImageMismatchError, StlnmfError
from ._util import examples

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "SPOT_DIAMETER_PER_SPACING",
    "check_image_covers_spots",
    "estimate_spot_diameter",
    "get_image",
    "get_library",
    "spot_diameter",
    "square_bin_size",
]

# Visium spots are 55 µm wide on a 100 µm pitch.
SPOT_DIAMETER_PER_SPACING = 0.55


def get_library(adata: AnnData, library_id: str | None = None) -> tuple[str, dict]:
    """Return ``(library_id, uns['spatial'][library_id])``.

    Parameters
    ----------
    adata
        A slide with ``uns['spatial']``.
    library_id
        Library to return; may be omitted when there is exactly one.

    Returns
    -------
    The library id and its dict (the stored object, not a copy: do not modify).

    Raises
    ------
    StlnmfError
        No ``uns['spatial']``, unknown ``library_id``, or several libraries and
        ``library_id=None``.
    """
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict) or not libraries:
        raise StlnmfError(
            "The slide has no uns['spatial'] entry, so there is no image or scale factor. "
            "Read it with read_slide(..., image=..., scalefactor=...) to attach an image."
        )
    if library_id is None:
        if len(libraries) > 1:
            raise StlnmfError(
                f"The slide has {len(libraries)} libraries in uns['spatial']: "
                f"{examples(libraries.keys(), 20)}. Pass library_id= to choose one."
            )
        library_id = next(iter(libraries))
    elif library_id not in libraries:
        raise StlnmfError(
            f"Library {library_id!r} is not in uns['spatial']; available: "
            f"{examples(libraries.keys(), 20)}."
        )
    return library_id, libraries[library_id]


def _stored_diameter(scalefactors: dict) -> float | None:
    diameter = scalefactors.get("spot_diameter_fullres")
    return None if diameter is None else float(diameter)


def get_image(
    adata: AnnData,
    library_id: str | None = None,
    *,
    prefer: Sequence[str] = ("hires", "lowres"),
) -> tuple[np.ndarray, float, float | None] | None:
    """Return the tissue image, its scale factor and the stored spot diameter.

    Parameters
    ----------
    adata
        A slide.
    library_id
        Library in ``uns['spatial']``; may be omitted when there is exactly one.
    prefer
        Image keys to try, in order.

    Returns
    -------
    ``(image, scalefactor, spot_diameter_fullres)`` where image pixel =
    ``obsm['spatial'] * scalefactor`` and ``spot_diameter_fullres`` is in
    ``obsm['spatial']`` units (None if not stored; :func:`spot_diameter` estimates it);
    or None when the slide has no ``uns['spatial']`` or none of the ``prefer`` images.

    Raises
    ------
    StlnmfError
        Several libraries and ``library_id=None``, or unknown ``library_id``.
    ImageMismatchError
        The chosen image has no ``tissue_<key>_scalef`` scale factor.
    """
    if not adata.uns.get("spatial"):
        return None
    library_id, lib = get_library(adata, library_id)
    images = lib.get("images") or {}
    scalefactors = lib.get("scalefactors") or {}
    for key in prefer:
        if key not in images or images[key] is None:
            continue
        sf_key = f"tissue_{key}_scalef"
        if sf_key not in scalefactors:
            raise ImageMismatchError(
                f"Library {library_id!r} has a {key!r} image but no scalefactors[{sf_key!r}], "
                "so spots cannot be placed on it. Add it (image pixels per coordinate unit)."
            )
        return np.asarray(images[key]), float(scalefactors[sf_key]), _stored_diameter(scalefactors)
    return None


def estimate_spot_diameter(xy: np.ndarray) -> float | None:
    """``SPOT_DIAMETER_PER_SPACING`` times the spot spacing of the finite positions ``xy``.

    The spacing is :func:`napari_stlnmf.graph.spot_spacing` (median nearest-neighbour
    distance). None for fewer than two spots or when most spots share their position.
    """
    from ..graph import spot_spacing

    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    if len(xy) < 2:
        return None
    try:
        return SPOT_DIAMETER_PER_SPACING * spot_spacing(xy)
    except CoordinateError:  # duplicated positions: no spacing to go by
        return None


def spot_diameter(
    adata: AnnData, library_id: str | None = None, *, estimate: bool = True
) -> float | None:
    """Spot diameter in ``obsm['spatial']`` units: what to draw spots with.

    The library's ``scalefactors['spot_diameter_fullres']`` when stored (and positive);
    else :func:`estimate_spot_diameter` (0.55 x the spot spacing, Visium's ratio), or
    1.0 when that is unknown too (a single spot). With ``estimate=False``: the stored
    diameter or None.

    Raises
    ------
    StlnmfError
        Several libraries and ``library_id=None``, or unknown ``library_id``.
    """
    if adata.uns.get("spatial"):
        _, lib = get_library(adata, library_id)
        stored = _stored_diameter(lib.get("scalefactors") or {})
        if stored is not None and stored > 0:
            return stored
    if not estimate:
        return None
    estimated = None
    if SPATIAL_KEY in adata.obsm:
        estimated = estimate_spot_diameter(adata.obsm[SPATIAL_KEY])
    return 1.0 if estimated is None else estimated


def square_bin_size(adata: AnnData, library_id: str | None = None) -> float | None:
    """Side of the slide's square bins in ``obsm['spatial']`` units (full-resolution pixels):
    ``bin_size_um / microns_per_pixel`` of the library's scale factors, as Visium HD bins carry
    them (:mod:`.visium_hd`); None for round spots, cells, or a slide without ``uns['spatial']``.

    Raises
    ------
    StlnmfError
        Several libraries and ``library_id=None``, or unknown ``library_id``.
    """
    if not adata.uns.get("spatial"):
        return None
    _, lib = get_library(adata, library_id)
    scalefactors = lib.get("scalefactors") or {}
    bin_um, mpp = scalefactors.get("bin_size_um"), scalefactors.get("microns_per_pixel")
    if bin_um is None or mpp is None or float(mpp) <= 0 or float(bin_um) <= 0:
        return None
    return float(bin_um) / float(mpp)


def check_image_covers_spots(
    adata: AnnData,
    *,
    library_id: str | None = None,
    image_key: str | None = None,
    tolerance: float = 0.05,
) -> None:
    """Check that the spots, scaled to image pixels, lie on the tissue image.

    Spot ``(x, y) * tissue_<image_key>_scalef`` must fall inside the image,
    allowing a margin of ``tolerance`` times the image width/height. Catches a
    wrong or missing scale factor (e.g. full-resolution coordinates on the
    lowres image with scale factor 1). Slides without images pass.

    Parameters
    ----------
    adata
        A slide with ``obsm['spatial']`` and ``uns['spatial']``.
    library_id
        Library in ``uns['spatial']``; may be omitted when there is exactly one.
    image_key
        Image to check (``'hires'``, ``'lowres'``); default: every image present.
    tolerance
        Allowed margin as a fraction of the image size.

    Raises
    ------
    ImageMismatchError
        Spots fall outside the image, or the scale factor is missing.
    StlnmfError
        Several libraries and ``library_id=None``, or unknown ``library_id``.
    CoordinateError
        ``obsm['spatial']`` is missing.
    """
    if not adata.uns.get("spatial"):
        return
    library_id, lib = get_library(adata, library_id)
    images = lib.get("images") or {}
    scalefactors = lib.get("scalefactors") or {}
    if image_key is not None and image_key not in images:
        raise ImageMismatchError(
            f"Library {library_id!r} has no {image_key!r} image; available: "
            f"{examples(images.keys()) or 'none'}."
        )
    if SPATIAL_KEY not in adata.obsm:
        raise CoordinateError(f"No spot coordinates: obsm[{SPATIAL_KEY!r}] is missing.")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    if len(xy) == 0:
        return
    lo, hi = xy.min(axis=0), xy.max(axis=0)

    for key in [image_key] if image_key is not None else list(images):
        img = np.asarray(images[key])
        height, width = img.shape[:2]
        sf_key = f"tissue_{key}_scalef"
        if sf_key not in scalefactors:
            raise ImageMismatchError(
                f"Library {library_id!r} has a {key!r} image but no scalefactors[{sf_key!r}]; "
                "add the number of image pixels per coordinate unit."
            )
        scale = float(scalefactors[sf_key])
        size = np.array([width, height], dtype=np.float64)
        margin = tolerance * size
        plo, phi = lo * scale, hi * scale
        if np.all(plo >= -margin) and np.all(phi <= size + margin):
            continue
        raise ImageMismatchError(
            f"The spots do not lie on the {key!r} image of library {library_id!r}: spot "
            f"coordinates span x {lo[0]:.6g}..{hi[0]:.6g}, y {lo[1]:.6g}..{hi[1]:.6g}; at "
            f"scale factor {scale:.6g} that is x {plo[0]:.6g}..{phi[0]:.6g}, "
            f"y {plo[1]:.6g}..{phi[1]:.6g} px, but the image is {width} x {height} px "
            f"(width x height). {_suggest_scale(lo, hi, size, scalefactors, sf_key)}"
        )


def _suggest_scale(
    lo: np.ndarray, hi: np.ndarray, size: np.ndarray, scalefactors: dict, sf_key: str
) -> str:
    """Suggest a scale factor under which the spots fit the image."""
    for other in ("tissue_hires_scalef", "tissue_lowres_scalef"):
        if other == sf_key or other not in scalefactors:
            continue
        s = float(scalefactors[other])
        if s > 0 and np.all(lo * s >= 0) and np.all(hi * s <= size):
            return f"The scale factor {other}={s:.6g} fits: was the image mixed up?"
    if np.all(hi > 0):
        best = float(np.min(size / hi))
        return (
            f"The largest scale factor that keeps every spot on the image is about {best:.4g} "
            "(image pixels per coordinate unit); for Visium use tissue_hires_scalef or "
            "tissue_lowres_scalef from spatial/scalefactors_json.json."
        )
    return (
        "Coordinates are negative, so no scale factor maps them onto the image; check that "
        "obsm['spatial'] holds (x, y) image pixel positions."
    )
