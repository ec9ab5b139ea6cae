"""Slides and deconvolution results as napari layer-data tuples (pure: no Qt, no napari import).

World coordinates are the slide's full-resolution pixels, in napari's (row, col) = (y, x)
order: spots sit at ``obsm['spatial'][:, ::-1]`` and the tissue image gets
``scale = 1 / scalefactor`` so image pixel ``spatial * scalefactor`` lands on the spot.
Spots are drawn as discs :func:`napari_stlnmf.io.spot_diameter` wide (``spot_diameter_fullres``,
else estimated from the spacing), the same size as in the PNG maps of
:mod:`napari_stlnmf.plotting`; Visium HD bins as squares of their true side,
:func:`napari_stlnmf.io.square_bin_size` (``bin_size_um / microns_per_pixel``).

A slide read from a SpatialData store carries ``metadata['world_affine']`` in its library (the
(x, y) affine from ``obsm['spatial']`` to the store's coordinate system): the layers then get it
as their napari ``affine`` and lie over napari-spatialdata's layers of the same store. Layers
opened by napari-spatialdata (``metadata['sdata']``, ``['adata']``, ``['region_key']``,
``['instance_key']``) become a slide with :func:`spots_from_spatialdata_layer` and
:func:`slide_on_image`, through each layer's data-to-world transform (:func:`layer_to_world`).

Layers made here are tagged in ``metadata``:

- ``metadata['stlnmf_slide']``: ``{'slide_id', 'role': 'image'|'spots', 'library_id'}``;
  the spots layer also carries the AnnData (``metadata['adata']``, counts for the widget),
  ``metadata['path']`` and, for samples, ``metadata['reference']``/``['cell_type_key']``.
- ``metadata['stlnmf_result']``: ``{'source': slide_id, 'role': 'cell_type'|'dominant'|
  'fit_error', 'cell_type': name|None}``; ``metadata['adata']`` is the annotated copy with
  ``obsm['stlnmf_proportions']`` (what the writer exports). Re-running replaces layers by
  this tag (not by name: result layers are named ``"<slide> · <type>"``, so two slides'
  maps never collide).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from . import io
from ._constants import FIT_ERROR_KEY, PROPORTIONS_KEY, QC_KEY, SPATIAL_KEY
from .errors import ImageMismatchError, StlnmfError
from .io._util import examples
from .io.spatialdata import SOURCE_KEY, WORLD_AFFINE_KEY, pick_level

__all__ = [
    "DOMINANT_LAYER",
    "FIT_ERROR_LAYER",
    "RESULT_TAG",
    "SLIDE_TAG",
    "dominant_colors",
    "fine_tuning_note",
    "image_for_features",
    "is_spatialdata_layer",
    "layer_to_world",
    "result_layer_name",
    "result_layers",
    "result_layers_from_adata",
    "results_table",
    "sample_columns",
    "slide_for_deconvolution",
    "slide_layers",
    "slide_on_image",
    "spot_diameter",
    "spot_symbol",
    "spots_from_spatialdata_layer",
    "top_types",
    "write_results_to_spatialdata_layer",
    "zero_transparent_colormap",
]

SLIDE_TAG = "stlnmf_slide"
RESULT_TAG = "stlnmf_result"
DOMINANT_LAYER = "dominant cell type"
FIT_ERROR_LAYER = "fit error"
NO_ESTIMATE = "no estimate"
FIT_ERROR_COLUMN = "fit_error"  # feature/CSV column names (short: shown on hover)
QC_COLUMN = "qc"
# the result layers' first feature column: napari's status bar lists the features in order on
# one line, so the spot's largest types come first (the full table follows, cut off by the bar)
TOP_TYPES_COLUMN = "top"
TOP_TYPES_SHOWN = 3
LAYER_NAME_SEPARATOR = " · "
PROPORTION_COLORMAP = "viridis"
FIT_ERROR_COLORMAP = "magma"


# --------------------------------------------------------------------------- #
# colours
# --------------------------------------------------------------------------- #


def zero_transparent_colormap(name: str = PROPORTION_COLORMAP, n: int = 32) -> dict:
    """A napari colormap (as a dict) equal to ``name`` on (0, 1] but transparent at exactly 0.

    Proportions below the core's ``min_proportion`` are exact zeros, so absent cell types
    leave the image visible. NaN (spots without an estimate) are transparent in napari too.
    """
    import matplotlib

    cmap = matplotlib.colormaps[name]
    controls = np.r_[0.0, np.linspace(1e-3, 1.0, n)]
    colors = np.vstack([[0.0, 0.0, 0.0, 0.0], cmap(np.linspace(0.0, 1.0, n))])
    return {"colors": colors, "controls": controls, "name": f"{name} (0 transparent)"}


def dominant_colors(cell_types) -> dict[str, str]:
    """Distinct categorical colours (tab10/tab20, then hues) per type; no estimate = transparent."""
    import matplotlib
    from matplotlib.colors import hsv_to_rgb, to_hex

    types = [str(t) for t in cell_types]
    n = len(types)
    if n <= 10:
        cols = [matplotlib.colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        cols = [matplotlib.colormaps["tab20"](i) for i in range(n)]
    else:
        cols = [hsv_to_rgb((i / n, 0.75 - 0.3 * (i % 2), 0.95)) for i in range(n)]
    out = {t: to_hex(c) for t, c in zip(types, cols)}
    out[NO_ESTIMATE] = "#00000000"
    return out


# --------------------------------------------------------------------------- #
# slides
# --------------------------------------------------------------------------- #


def _display_library(adata, library_id=None) -> str | None:
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
    lib = _display_library(adata, library_id)
    side = None if lib is None else io.square_bin_size(adata, lib)
    return side if side is not None else io.spot_diameter(adata, lib)


def spot_symbol(adata, library_id=None) -> str:
    """The napari Points symbol of the spots: ``'square'`` for Visium HD bins, else ``'disc'``."""
    lib = _display_library(adata, library_id)
    return "disc" if lib is None or io.square_bin_size(adata, lib) is None else "square"


def _spots_yx(adata) -> np.ndarray:
    return np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, 1::-1].copy()


# (x, y) homogeneous <-> napari's (row, col): swap the two axes
_SWAP_XY = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def _world_affine(adata, library_id=None) -> np.ndarray | None:
    """napari (row, col) affine from ``obsm['spatial']`` to world, or None (world = those)."""
    lib = _display_library(adata, library_id)
    if lib is None:
        return None
    affine = (adata.uns["spatial"][lib].get("metadata") or {}).get(WORLD_AFFINE_KEY)
    if affine is None:
        return None
    affine = np.asarray(affine, dtype=np.float64)
    return None if np.allclose(affine, np.eye(3)) else _SWAP_XY @ affine @ _SWAP_XY


def _obs_features(adata) -> pd.DataFrame:
    feats = pd.DataFrame({"barcode": adata.obs_names.astype(str).to_numpy()})
    for col in adata.obs.columns:
        s = adata.obs[col]
        if (
            isinstance(s.dtype, pd.CategoricalDtype)
            or pd.api.types.is_numeric_dtype(s.dtype)
            or pd.api.types.is_bool_dtype(s.dtype)
        ) and str(col) not in feats:
            feats[str(col)] = s.to_numpy()
    return feats


def slide_layers(
    adata,
    *,
    name: str | None = None,
    path=None,
    library_id: str | None = None,
    reference=None,
    cell_type_key: str | None = None,
) -> list[tuple]:
    """Tissue image (if any) + spots as napari layer-data tuples, in shared world coordinates."""
    lib = _display_library(adata, library_id)
    found = io.get_image(adata, lib)
    image, scalef, _ = found if found is not None else (None, None, None)
    name = name or (Path(path).name if path is not None else (lib or "slide"))
    slide_id = uuid.uuid4().hex
    world = {} if (affine := _world_affine(adata, lib)) is None else {"affine": affine}
    layers = []
    if image is not None:
        s = 1.0 / float(scalef)
        layers.append(
            (
                np.asarray(image),
                {
                    "name": f"{name} image",
                    "rgb": np.asarray(image).ndim == 3 and np.asarray(image).shape[-1] in (3, 4),
                    "scale": (s, s),
                    "translate": (0.0, 0.0),
                    **world,
                    "metadata": {
                        SLIDE_TAG: {"slide_id": slide_id, "role": "image", "library_id": lib}
                    },
                },
                "image",
            )
        )
    metadata = {
        SLIDE_TAG: {"slide_id": slide_id, "role": "spots", "library_id": lib},
        "adata": adata,
        "path": None if path is None else str(path),
    }
    if reference is not None:
        metadata["reference"] = str(reference)
    if cell_type_key is not None:
        metadata["cell_type_key"] = cell_type_key
    layers.append(
        (
            _spots_yx(adata),
            {
                "name": f"{name} spots",
                "features": _obs_features(adata),
                "size": spot_diameter(adata, lib),
                "symbol": spot_symbol(adata, lib),
                "face_color": [1.0, 1.0, 1.0, 0.25],
                "border_color": [1.0, 1.0, 1.0, 0.8],
                "border_width": 0.08,
                "opacity": 1.0,
                **world,
                "metadata": metadata,
            },
            "points",
        )
    )
    return layers


def slide_for_deconvolution(adata, image=None, *, scale=None, translate=None, library_id=None):
    """The slide to deconvolve, with ``image`` (another napari image layer) as its tissue image.

    ``scale``/``translate`` are the image layer's (row, col) world transform; the image must
    share the spots' world coordinates (full-resolution pixels), i.e. isotropic scale and no
    translation, so image pixel = ``spatial / scale``. ``image=None`` returns ``adata``.
    Counts, obs and var are shared with ``adata`` (not copied); ``adata`` is not modified.
    """
    import anndata as ad

    if image is None:
        return adata
    sy, sx = (1.0, 1.0) if scale is None else (float(scale[-2]), float(scale[-1]))
    ty, tx = (0.0, 0.0) if translate is None else (float(translate[-2]), float(translate[-1]))
    if not np.isclose(sy, sx, rtol=1e-3) or sx <= 0:
        raise ImageMismatchError(
            f"The image layer's scale is {sy:g} x {sx:g} (row x col); the graph features need "
            "square pixels. Pick another image layer or untick 'follow the tissue image'."
        )
    if abs(ty) > 0.5 * sy or abs(tx) > 0.5 * sx:
        raise ImageMismatchError(
            f"The image layer is translated by ({ty:g}, {tx:g}); spots and image must share "
            "full-resolution pixel coordinates with the origin at (0, 0)."
        )
    lib = _display_library(adata, library_id)
    # only a stored diameter is carried over: an estimate would change the image features
    diameter = None if lib is None else io.spot_diameter(adata, lib, estimate=False)
    scalefactors = {"tissue_hires_scalef": 1.0 / sx}
    if diameter:
        scalefactors["spot_diameter_fullres"] = diameter
    if lib is not None and io.square_bin_size(adata, lib) is not None:
        # Visium HD bins stay square bins of their size for the graph
        stored = io.get_library(adata, lib)[1]["scalefactors"]
        for key in ("bin_size_um", "microns_per_pixel"):
            scalefactors[key] = float(stored[key])
    lib = lib or "napari"
    out = ad.AnnData(
        X=adata.X,
        obs=adata.obs,
        var=adata.var,
        obsm={SPATIAL_KEY: np.asarray(adata.obsm[SPATIAL_KEY])},
    )
    out.uns["spatial"] = {
        lib: {"images": {"hires": np.asarray(image)}, "scalefactors": scalefactors, "metadata": {}}
    }
    io.check_image_covers_spots(out, library_id=lib)
    return out


# --------------------------------------------------------------------------- #
# layers of napari-spatialdata, and images in any world frame
# --------------------------------------------------------------------------- #

SPATIALDATA_LAYER_KEYS = ("sdata", "adata", "region_key", "instance_key")
_LAYER_DIAMETER = "stlnmf_layer_diameter"  # uns: spot diameter in the layer's data units


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


def is_spatialdata_layer(metadata) -> bool:
    """Whether a layer's ``metadata`` is napari-spatialdata's for spots with a table."""
    return all(metadata.get(k) is not None for k in SPATIALDATA_LAYER_KEYS)


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


def _polygon_centre_and_area(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """Area centroid and area of a (row, col) polygon; the vertex mean for degenerate ones and
    ellipses (napari stores an ellipse as its 4 bounding-box corners, whose mean is its centre;
    the area is then the box's, 4/pi of the ellipse's, which only sizes the drawing)."""
    v = np.asarray(vertices, dtype=np.float64)[:, -2:]
    if len(v) < 3:
        return v.mean(axis=0), 0.0
    r, c = v[:, 0], v[:, 1]
    cross = r * np.roll(c, -1) - np.roll(r, -1) * c
    area = cross.sum() / 2
    if abs(area) < 1e-12:
        return v.mean(axis=0), 0.0
    centre = np.array([((r + np.roll(r, -1)) * cross).sum(), ((c + np.roll(c, -1)) * cross).sum()])
    return centre / (6 * area), abs(float(area))


def spots_from_spatialdata_layer(data, metadata, *, sizes=None):
    """A slide from a Points or Shapes layer opened by napari-spatialdata.

    ``metadata['adata']`` (the table rows joined to the element) gives the counts,
    ``metadata['indices']`` the element's instance id of each shape/point of ``data``. Spots
    are matched by ``obs[instance_key]``; shapes/points without a table row are left out.
    ``obsm['spatial']`` is in the layer's *data* (x, y): map it with :func:`slide_on_image`.
    The spot diameter is the element's ``radius`` x 2 when it has one, that of a circle of the
    polygons' median area for shapes, else the median ``sizes`` (a Points layer's).
    """
    import anndata as ad

    from .errors import CoordinateError

    table = metadata["adata"]
    instance_key, region_key = metadata["instance_key"], metadata["region_key"]
    areas = None
    if isinstance(data, np.ndarray):
        yx = np.asarray(data, dtype=np.float64)[:, -2:]
    else:  # Shapes: one vertex array per shape
        centres, areas = zip(*(_polygon_centre_and_area(v) for v in data)) if data else ((), ())
        yx = np.array(centres, dtype=np.float64).reshape(-1, 2)
    indices = metadata.get("indices")
    ids = pd.Index(
        np.asarray(indices if indices is not None else range(len(yx))).astype(str)[: len(yx)]
    )
    table_ids = pd.Index(table.obs[instance_key].astype(str).to_numpy())
    if table_ids.has_duplicates:  # several regions: keep the layer's element's rows
        keep = table.obs[region_key].astype(str).to_numpy() == str(metadata.get("name"))
        table, table_ids = table[keep], table_ids[keep]
    where = ids.get_indexer(table_ids)
    if (where < 0).all():
        raise CoordinateError(
            f"No row of the layer's table has an instance id of its shapes (obs[{instance_key!r}]"
            f" vs the element's index, e.g. {examples(ids)}); re-open the layer."
        )
    rows = np.flatnonzero(where >= 0)
    obs = table.obs.iloc[rows].copy()
    obs.index = table_ids[rows]
    out = ad.AnnData(X=table.X[rows], obs=obs, var=table.var.copy())
    out.obsm[SPATIAL_KEY] = yx[where[rows]][:, ::-1].copy()
    element = _element_or_none(metadata)
    if element is not None and "radius" in getattr(element, "columns", ()):
        diameter = 2.0 * float(np.nanmedian(element["radius"].to_numpy(dtype=np.float64)))
    elif areas:  # polygons: a circle of the same area
        diameter = 2.0 * float(np.sqrt(np.median(areas) / np.pi))
    elif sizes is not None and np.size(sizes):
        diameter = float(np.nanmedian(np.asarray(sizes, dtype=np.float64)))
    else:
        diameter = None
    out.uns[_LAYER_DIAMETER] = diameter
    out.uns[SOURCE_KEY] = {
        "table": str((metadata.get("table_names") or [""])[0] or ""),
        "region": str(metadata.get("name") or ""),
        "region_key": str(region_key),
        "instance_key": str(instance_key),
        "coordinate_system": str(metadata.get("_current_cs") or ""),
        "image": "",
        "path": "",
    }
    return out


def write_results_to_spatialdata_layer(metadata, result) -> str:
    """Write ``result`` into the table of a napari-spatialdata layer's SpatialData (in memory;
    :func:`~napari_stlnmf.io.write_spatialdata_results`) and refresh the layer's
    ``metadata['adata']`` so napari-spatialdata colours the layer by the new columns. Returns
    the table's name."""
    import spatialdata as sd

    sdata = metadata["sdata"]
    io.write_spatialdata_results(sdata, result, save=False)
    table = result.adata.uns[SOURCE_KEY]["table"] or next(iter(sdata.tables))
    _, joined = sd.join_spatialelement_table(
        sdata=sdata, spatial_element_names=metadata["name"], table_name=table,
        how="left", match_rows="left",
    )  # fmt: skip
    metadata["adata"] = joined
    return table


def _element_or_none(metadata):
    try:
        return metadata["sdata"][metadata["name"]]
    except (KeyError, TypeError):
        return None


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
    yx = _spots_yx(adata)
    xy = (yx @ frame[:2, :2].T + frame[:2, 2])[:, ::-1]
    diameter = adata.uns.get(_LAYER_DIAMETER)
    if diameter is None:
        lib = _display_library(adata, library_id)
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
    world = _SWAP_XY @ image_to_world @ _SWAP_XY  # back to (x, y)
    lib = library_id or "napari"
    out.uns["spatial"] = {
        lib: {"images": images, "scalefactors": scalefactors, "metadata": {WORLD_AFFINE_KEY: world}}
    }
    if image is not None:
        io.check_image_covers_spots(out, library_id=lib)
    return out


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #


def result_layer_name(slide_name: str | None, what: str) -> str:
    """``"<slide> · <what>"`` (a cell type, 'dominant cell type', 'fit error'), or ``what``."""
    return f"{slide_name}{LAYER_NAME_SEPARATOR}{what}" if slide_name else what


def top_types(proportions: pd.DataFrame, n: int = TOP_TYPES_SHOWN) -> np.ndarray:
    """Per spot, its ``n`` largest non-zero types with values: ``"Astro 0.52 · Neuron 0.31"``
    (``NO_ESTIMATE`` for spots without one)."""
    values = proportions.to_numpy(dtype=np.float64)
    types = np.asarray([str(c) for c in proportions.columns], dtype=object)
    order = np.argsort(-np.nan_to_num(values, nan=-1.0), axis=1)[:, :n]
    out = np.empty(len(values), dtype=object)
    for i, (row, best) in enumerate(zip(values, order)):
        parts = [f"{types[j]} {row[j]:.2f}" for j in best if np.isfinite(row[j]) and row[j] > 0]
        out[i] = LAYER_NAME_SEPARATOR.join(parts) if parts else NO_ESTIMATE
    return out


def sample_columns(adata) -> list[str]:
    """obs columns that can split a slide into samples (``library_key``): categorical (or
    string) columns with 2 to 100 values, those whose values are all libraries of
    ``uns['spatial']`` first."""
    libraries = set(map(str, (adata.uns.get("spatial") or {}).keys()))
    matching, other = [], []
    for col in adata.obs.columns:
        s = adata.obs[col]
        if not (isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(s.dtype)):
            continue
        values = set(map(str, pd.unique(s.dropna())))
        if not 2 <= len(values) <= 100:
            continue
        (matching if values <= libraries else other).append(str(col))
    return matching + other


def fine_tuning_note(train_info: dict | None, epochs_asked: int | None) -> str:
    """One sentence on how fine-tuning went, from ``result.info['train']`` ('' without it):
    whether it stopped before ``epochs_asked`` and why, or kept the shipped parameters."""
    if not train_info or not train_info.get("epochs"):
        return ""
    ran, best = int(train_info["epochs"]), int(train_info.get("best_epoch", 0))
    before = train_info.get("val_rmse_initial")
    after = train_info.get("val_rmse")
    gain = ""
    if before and after is not None and np.isfinite(before) and np.isfinite(after):
        gain = f" (validation error {before:.3g} → {after:.3g})"
    if best == 0:
        return (
            f"Fine-tuning ran {ran} epochs without improving on the shipped parameters{gain}; "
            "the shipped parameters were kept."
        )
    if epochs_asked and ran < int(epochs_asked):
        return (
            f"Fine-tuning stopped early, after {ran} of {int(epochs_asked)} epochs: the "
            f"validation error had not improved since epoch {best}, whose parameters are "
            f"used{gain}."
        )
    return f"Fine-tuned for {ran} epochs; the parameters of epoch {best} are used{gain}."


def results_table(proportions: pd.DataFrame, fit_error=None, qc=None) -> pd.DataFrame:
    """One row per spot: barcode, every type's proportion, dominant type, fit error, QC."""
    prop = proportions.astype(np.float64)
    types = [str(c) for c in prop.columns]
    values = prop.to_numpy()
    has = np.isfinite(values).all(1) & (np.nan_to_num(values).sum(1) > 0)
    dom_idx = np.nan_to_num(values, nan=-1.0).argmax(1)
    dominant = np.where(has, np.asarray(types, dtype=object)[dom_idx], NO_ESTIMATE)
    table = pd.DataFrame(values, columns=types)
    table.insert(0, "barcode", prop.index.astype(str).to_numpy())
    table["dominant"] = pd.Categorical(dominant, categories=types + [NO_ESTIMATE])
    table["dominant_proportion"] = np.where(has, values[np.arange(len(values)), dom_idx], np.nan)
    table[FIT_ERROR_COLUMN] = (
        np.full(len(table), np.nan)
        if fit_error is None
        else np.asarray(pd.Series(fit_error).reindex(prop.index), dtype=float)
    )
    table[QC_COLUMN] = (
        np.where(has, "ok", "no estimate")
        if qc is None
        else pd.Series(qc).reindex(prop.index).astype(str).to_numpy()
    )
    return table


def result_layers(
    proportions: pd.DataFrame,
    fit_error,
    qc,
    slide,
    *,
    source: str | None = None,
    annotated=None,
    visible: str = "first",
    library_id=None,
    slide_name: str | None = None,
) -> list[tuple]:
    """Per-type maps, dominant type and fit error as Points layer-data tuples.

    ``slide`` gives the spot positions and diameter (its ``obs_names`` must match
    ``proportions.index``). ``annotated`` (the result's AnnData copy) is kept in each layer's
    ``metadata['adata']`` for export. ``visible='first'`` shows only the first type's map.
    ``slide_name`` prefixes the layer names (:func:`result_layer_name`).
    """
    if list(map(str, slide.obs_names)) != list(map(str, proportions.index)):
        proportions = proportions.reindex(slide.obs_names.astype(str))
    table = results_table(proportions, fit_error, qc)
    table.insert(0, TOP_TYPES_COLUMN, top_types(proportions))
    types = [str(c) for c in proportions.columns]
    yx = _spots_yx(slide)
    size = spot_diameter(slide, library_id)
    source = source or uuid.uuid4().hex

    def meta(role, cell_type=None):
        return {
            RESULT_TAG: {"source": source, "role": role, "cell_type": cell_type},
            "adata": annotated,
            "cell_types": types,
        }

    symbol = spot_symbol(slide, library_id)
    common = {"size": size, "symbol": symbol, "border_width": 0.0, "opacity": 0.95}
    if (affine := _world_affine(slide, library_id)) is not None:
        common["affine"] = affine
    cmap = zero_transparent_colormap()
    layers = []
    for i, t in enumerate(types):
        layers.append(
            (
                yx,
                {
                    **common,
                    "features": table.copy(),
                    "name": result_layer_name(slide_name, t),
                    "face_color": t,
                    "face_colormap": cmap,
                    "face_contrast_limits": (0.0, 1.0),
                    "visible": visible == "all" or (visible == "first" and i == 0),
                    "metadata": meta("cell_type", t),
                },
                "points",
            )
        )
    layers.append(
        (
            yx,
            {
                **common,
                "features": table.copy(),
                "name": result_layer_name(slide_name, DOMINANT_LAYER),
                "face_color": "dominant",
                "face_color_cycle": dominant_colors(types),
                "visible": visible == "all",
                "metadata": meta("dominant"),
            },
            "points",
        )
    )
    fe = table[FIT_ERROR_COLUMN].to_numpy(dtype=float)
    hi = float(np.nanpercentile(fe, 99)) if np.isfinite(fe).any() else 1.0
    layers.append(
        (
            yx,
            {
                **common,
                "features": table.copy(),
                "name": result_layer_name(slide_name, FIT_ERROR_LAYER),
                "face_color": FIT_ERROR_COLUMN,
                "face_colormap": FIT_ERROR_COLORMAP,
                "face_contrast_limits": (0.0, max(hi, 1e-6)),
                "visible": visible == "all",
                "metadata": meta("fit_error"),
            },
            "points",
        )
    )
    # layers added later are drawn on top: put the first type's map last
    return layers[len(types) :][::-1] + layers[: len(types)][::-1]


def result_layers_from_adata(
    adata, *, source=None, library_id=None, slide_name=None
) -> list[tuple]:
    """Result layers of an AnnData that holds ``obsm['stlnmf_proportions']`` ([] otherwise)."""
    if PROPORTIONS_KEY not in adata.obsm:
        return []
    prop = adata.obsm[PROPORTIONS_KEY]
    if not isinstance(prop, pd.DataFrame):
        cell_types = (adata.uns.get("stlnmf") or {}).get("cell_types")
        prop = pd.DataFrame(
            np.asarray(prop),
            index=adata.obs_names,
            columns=None if cell_types is None else list(cell_types),
        )
    prop = prop.set_axis(adata.obs_names.astype(str))
    fit = adata.obs.get(FIT_ERROR_KEY)
    qc = adata.obs.get(QC_KEY)
    if fit is not None:
        fit = fit.set_axis(prop.index)
    if qc is not None:
        qc = qc.set_axis(prop.index)
    return result_layers(
        prop,
        fit,
        qc,
        adata,
        source=source,
        annotated=adata,
        library_id=library_id,
        slide_name=slide_name,
    )
