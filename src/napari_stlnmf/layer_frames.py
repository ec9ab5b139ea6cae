"""Coordinate frames of the napari layers (pure: no Qt, no napari import).

World coordinates are the slide's full-resolution pixels, in napari's (row, col) = (y, x)
order: spots sit at ``obsm['spatial'][:, ::-1]`` (:func:`spots_yx`); a SpatialData slide's
library carries ``metadata['world_affine']``, the (x, y) affine to the store's coordinate
system, which becomes the layers' napari ``affine`` (:func:`world_affine`). Spots are
:func:`spot_diameter` wide, drawn as :func:`spot_symbol` (squares for Visium HD bins).
:func:`layer_to_world`, :func:`image_for_features` and :func:`slide_on_image` join layers
in any world frame (napari-spatialdata's elements' affines included).
"""

from __future__ import annotations

import numpy as np

from . import io
from ._constants import SPATIAL_KEY
from .errors import StlnmfError
from .io.spatialdata import SOURCE_KEY, WORLD_AFFINE_KEY, pick_level

__all__ = [
    "LAYER_DIAMETER_KEY",
    "SWAP_XY",
    "display_library",
    "image_for_features",
    "layer_to_world",
    "slide_on_image",
    "spot_diameter",
    "spot_symbol",
    "spots_yx",
    "world_affine",
]

LAYER_DIAMETER_KEY = "stlnmf_layer_diameter"  # uns: spot diameter in the layer's data units


def display_library(adata, library_id=None) -> str | None:
    """The library to show: ``library_id``, the only one, or (several libraries) the first."""
    if not adata.uns.get("spatial"):
        return None
    try:
        return io.get_library(adata, library_id)[0]
    except StlnmfError:
        return next(iter(adata.uns["spatial"]))  # several libraries: show the first


def spot_diameter(adata, library_id=None) -> float:
    """Spot size of the layers, in full-resolution pixels, for the library shown (the first one
    when there are several and ``library_id`` is None): the side of Visium HD bins
    (:func:`napari_stlnmf.io.square_bin_size`), else :func:`napari_stlnmf.io.spot_diameter`."""
    lib = display_library(adata, library_id)
    side = None if lib is None else io.square_bin_size(adata, lib)
    return side if side is not None else io.spot_diameter(adata, lib)


def spot_symbol(adata, library_id=None) -> str:
    """The napari Points symbol of the spots: ``'square'`` for Visium HD bins, else ``'disc'``."""
    lib = display_library(adata, library_id)
    return "disc" if lib is None or io.square_bin_size(adata, lib) is None else "square"


def spots_yx(adata) -> np.ndarray:
    return np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, 1::-1].copy()


# (x, y) homogeneous <-> napari's (row, col): swap the two axes
SWAP_XY = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def world_affine(adata, library_id=None) -> np.ndarray | None:
    """napari (row, col) affine from ``obsm['spatial']`` to world, or None (world = those)."""
    lib = display_library(adata, library_id)
    if lib is None:
        return None
    affine = (adata.uns["spatial"][lib].get("metadata") or {}).get(WORLD_AFFINE_KEY)
    if affine is None:
        return None
    affine = np.asarray(affine, dtype=np.float64)
    return None if np.allclose(affine, np.eye(3)) else SWAP_XY @ affine @ SWAP_XY


def image_for_features(data, image_to_world, *, multiscale=False, downsample_factors=None):
    """An image layer's data as one array for the graph features, and that array's (row, col)
    affine to world: the finest pyramid level at most ``MAX_IMAGE_SIDE`` wide; channel-first
    images (napari-spatialdata's non-RGB ones) keep their first channel."""
    levels = list(data) if multiscale else [data]
    shapes = [tuple(int(n) for n in np.shape(level)) for level in levels]
    rgb_last = [len(sh) == 3 and sh[-1] in (3, 4) for sh in shapes]
    planes = [sh[-3:-1] if last else sh[-2:] for sh, last in zip(shapes, rgb_last)]
    i = pick_level(planes)
    array = np.asarray(levels[i])
    if array.ndim == 3 and not rgb_last[i] and array.shape[0] not in (1, 3, 4):
        array = array[0]  # fluorescence channels: the first
    affine = np.asarray(image_to_world, dtype=np.float64).copy()
    if i and downsample_factors is not None:
        rows, cols = np.asarray(downsample_factors, dtype=np.float64)[i][-2:]
        affine = affine @ np.diag([rows, cols, 1.0])
    return array, affine


def layer_to_world(layer) -> np.ndarray:
    """The 3 x 3 (row, col) affine of a napari layer's last two data axes to world coordinates
    (scale, translate, rotate, shear and ``affine`` together), read off ``layer.data_to_world``."""
    ndim = int(layer.ndim)
    origin = np.zeros(ndim)
    at_origin = np.asarray(layer.data_to_world(origin), dtype=np.float64)[-2:]
    matrix = np.eye(3)
    matrix[:2, 2] = at_origin
    for j, axis in enumerate((ndim - 2, ndim - 1)):
        unit = origin.copy()
        unit[axis] = 1.0
        matrix[:2, j] = np.asarray(layer.data_to_world(unit), dtype=np.float64)[-2:] - at_origin
    return matrix


def slide_on_image(adata, spots_to_world, image=None, image_to_world=None, *, library_id=None):
    """The slide with its spots moved into ``image``'s pixel frame through world coordinates.

    ``spots_to_world`` maps ``obsm['spatial']`` (as napari (row, col)) to world and
    ``image_to_world`` the image's pixels to world (3 x 3 (row, col) affines, e.g. from
    :func:`layer_to_world`; napari-spatialdata's layers hold the elements' affines). The result
    has ``obsm['spatial']`` in image pixels (scale factor 1), the image, the spot diameter in
    those pixels and, as ``world_affine``, the image-to-world map, so the result layers lie
    where the input layers are. Without an image, positions are the world's.
    """
    import anndata as ad

    from .io.images import to_uint8_rgb

    spots_to_world = np.asarray(spots_to_world, dtype=np.float64)
    image_to_world = np.eye(3) if image is None else np.asarray(image_to_world, dtype=np.float64)
    frame = np.linalg.inv(image_to_world) @ spots_to_world  # (row, col) spots -> image pixels
    yx = spots_yx(adata)
    xy = (yx @ frame[:2, :2].T + frame[:2, 2])[:, ::-1]
    diameter = adata.uns.get(LAYER_DIAMETER_KEY)
    if diameter is None:
        lib = display_library(adata, library_id)
        diameter = None if lib is None else io.spot_diameter(adata, lib, estimate=False)
    scalefactors = {}
    if diameter:
        scalefactors["spot_diameter_fullres"] = float(diameter) * float(
            np.sqrt(abs(np.linalg.det(frame[:2, :2])))
        )
    images = {}
    if image is not None:
        images["hires"] = to_uint8_rgb(np.asarray(image))
        scalefactors["tissue_hires_scalef"] = 1.0
    uns = {k: v for k, v in adata.uns.items() if k in (SOURCE_KEY,)}
    out = ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var, obsm={SPATIAL_KEY: xy}, uns=uns)
    world = SWAP_XY @ image_to_world @ SWAP_XY  # back to (x, y)
    lib = library_id or "napari"
    out.uns["spatial"] = {
        lib: {"images": images, "scalefactors": scalefactors, "metadata": {WORLD_AFFINE_KEY: world}}
    }
    if image is not None:
        io.check_image_covers_spots(out, library_id=lib)
    return out
