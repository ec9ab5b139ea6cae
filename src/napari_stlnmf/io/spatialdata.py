"""SpatialData ``.zarr`` stores (scverse): read a slide from a table and its spots, write results.

A SpatialData table is an AnnData whose ``uns['spatialdata_attrs']`` names the element(s) it
annotates (``region``), the obs column saying which element a row belongs to (``region_key``)
and the obs column with the row's instance id in that element (``instance_key``, matching the
element's index). :func:`read_spatialdata` joins the table's rows of one region to that
element's geometries (circle centres and radii, polygon centroids, or points) and returns a
slide in this package's convention (see :mod:`napari_stlnmf.io`):

- ``obs_names`` = the instance ids (as strings), in the table's row order;
- ``obsm['spatial']`` = spot centres in the chosen image's full-resolution (level-0) pixels, or
  in the coordinate system's units when the store has no image;
- ``uns['spatial'][library]`` = the image (a pyramid level at most ``MAX_IMAGE_SIDE`` wide) with
  ``tissue_hires_scalef`` and ``spot_diameter_fullres``, and in ``metadata['world_affine']`` the
  3 x 3 (x, y) affine from ``obsm['spatial']`` to the coordinate system, which the napari layers
  use so they lie over napari-spatialdata's layers of the same store;
- ``uns['stlnmf_spatialdata']`` = where the rows came from (table, region, keys, coordinate
  system, image, path), so :func:`write_spatialdata_results` finds its way back.

:func:`write_spatialdata_results` puts a deconvolution's results into the table (or a new one):
``obsm['stlnmf_proportions']`` and one ``obs`` column per cell type, the dominant type, the fit
error and the QC flag, so napari-spatialdata and spatialdata-plot colour by them.

spatialdata is an optional dependency (``pip install "napari-stlnmf[spatialdata]"``), imported
only inside the functions; :func:`detect` only looks at file names. Readers of vendor formats are
spatialdata-io's (``spatialdata_io.visium_hd(path)``, ``xenium``, ...): pass their result here.
Reading never writes to the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import (
    FIT_ERROR_KEY,
    MRNA_FRACTIONS_KEY,
    PROPORTIONS_KEY,
    QC_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from ..errors import CoordinateError, DuplicateNamesError, SpatialDataError
from ._util import examples
from .images import to_uint8_rgb
from .registry import SlideFormat

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "INSTALL_HINT",
    "MAX_IMAGE_SIDE",
    "SOURCE_KEY",
    "WORLD_AFFINE_KEY",
    "is_spatialdata",
    "read_spatialdata",
    "write_spatialdata_results",
]

INSTALL_HINT = 'pip install "napari-stlnmf[spatialdata]"'
SOURCE_KEY = "stlnmf_spatialdata"  # uns: where the slide's rows came from in the store
WORLD_AFFINE_KEY = "world_affine"  # uns['spatial'][lib]['metadata']: obsm['spatial'] -> world
# image features and display need no more; full-resolution H&E (20k px) would not fit in memory
MAX_IMAGE_SIDE = 4000
_ELEMENT_FOLDERS = ("tables", "shapes", "points", "images", "labels")


# --------------------------------------------------------------------------- #
# the optional dependency and the format's cheap detection
# --------------------------------------------------------------------------- #


def _import_spatialdata():
    try:
        import spatialdata
    except ImportError as err:
        raise SpatialDataError(
            f"Reading or writing SpatialData needs the optional spatialdata package: {INSTALL_HINT}"
            f" ({err})."
        ) from err
    return spatialdata


def is_spatialdata(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`spatialdata.SpatialData` (without importing spatialdata)."""
    return any(
        cls.__name__ == "SpatialData" and cls.__module__.startswith("spatialdata")
        for cls in type(obj).__mro__
    )


def _root_attrs(path: Path) -> dict:
    for name in ("zarr.json", ".zattrs"):  # zarr v3, v2
        file = path / name
        if file.is_file():
            try:
                meta = json.loads(file.read_text())
            except (OSError, ValueError):
                return {}
            return meta.get("attributes", meta) if name == "zarr.json" else meta
    return {}


def detect(path: Path) -> bool:
    """A folder with SpatialData's root attributes, or a ``.zarr`` with its element folders."""
    if not path.is_dir():
        return False
    if "spatialdata_attrs" in _root_attrs(path):
        return True
    has_group = (path / "zarr.json").is_file() or (path / ".zgroup").is_file()
    return (
        path.suffix.lower() == ".zarr"
        and has_group
        and any((path / f).is_dir() for f in ("tables", "shapes", "points"))
    )


def _as_spatialdata(source):
    if is_spatialdata(source):
        return source, ""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"SpatialData store {str(path)!r} does not exist.")
        sd = _import_spatialdata()
        try:
            return sd.read_zarr(path), str(path)
        except Exception as err:  # any reader failure: say which store
            raise SpatialDataError(
                f"Cannot read {str(path)!r} as a SpatialData store: {err}"
            ) from err
    raise SpatialDataError(
        f"Expected a SpatialData object or the path of a .zarr store, not {type(source).__name__}."
    )


# --------------------------------------------------------------------------- #
# choosing the table, region and image
# --------------------------------------------------------------------------- #


def _table_keys(table: AnnData, name: str) -> tuple[list[str], str, str]:
    attrs = table.uns.get("spatialdata_attrs") or {}
    region, region_key, instance_key = (
        attrs.get("region"),
        attrs.get("region_key"),
        attrs.get("instance_key"),
    )
    if region is None or not region_key or not instance_key:
        raise SpatialDataError(
            f"Table {name!r} annotates no element (its uns['spatialdata_attrs'] lacks region, "
            "region_key or instance_key). Link it with spatialdata.models.TableModel.parse(table, "
            "region=..., region_key=..., instance_key=...)."
        )
    return _annotated_regions(table), str(region_key), str(instance_key)


def _annotated_regions(table: AnnData) -> list[str]:
    region = (table.uns.get("spatialdata_attrs") or {}).get("region")
    if region is None:
        return []
    return [region] if isinstance(region, str) else [str(r) for r in region]


def _spot_elements(sdata) -> dict:
    return {**dict(sdata.shapes), **dict(sdata.points)}


def _choose_table(sdata, table: str | None) -> str:
    names = list(sdata.tables)
    if not names:
        raise SpatialDataError(
            "The SpatialData object has no table, so there are no counts to deconvolve. "
            f"Its elements: {examples([n for _, n, _ in sdata.gen_elements()], 20) or 'none'}."
        )
    if table is not None:
        if table not in names:
            raise SpatialDataError(
                f"Table {table!r} is not in the SpatialData object; available: "
                f"{examples(names, 20)}. Pass one of them as table=."
            )
        return table
    if len(names) == 1:
        return names[0]
    spots = _spot_elements(sdata)
    usable = [n for n in names if any(r in spots for r in _annotated_regions(sdata.tables[n]))]
    if len(usable) == 1:
        return usable[0]
    raise SpatialDataError(
        f"The SpatialData object has {len(names)} tables: {examples(names, 20)}. Pass table= to "
        "choose the one with the spots' counts."
    )


def _choose_region(sdata, table: AnnData, table_name: str, region: str | None) -> str:
    regions, _, _ = _table_keys(table, table_name)
    spots = _spot_elements(sdata)
    if region is not None:
        if region not in regions:
            raise SpatialDataError(
                f"Table {table_name!r} does not annotate {region!r}; it annotates "
                f"{examples(regions, 20)}. Pass one of them as region=."
            )
    else:
        usable = [r for r in regions if r in spots]
        if len(usable) != 1:
            which = "none of which is" if not usable else f"{len(usable)} of which are"
            raise SpatialDataError(
                f"Table {table_name!r} annotates {examples(regions, 20)}, {which} a shapes or "
                "points element. Pass region= to choose the spots."
            )
        region = usable[0]
    if region not in spots:
        kind = "a labels element" if region in sdata.labels else "missing from the object"
        raise SpatialDataError(
            f"Region {region!r} of table {table_name!r} is {kind}; spots must be circles, "
            "polygons or points (convert labels with spatialdata.to_circles)."
        )
    return region


def _choose_image(sdata, image: str | None, coordinate_system: str) -> str | None:
    from spatialdata.transformations import get_transformation

    names = list(sdata.images)
    if image is not None:
        if image not in names:
            raise SpatialDataError(
                f"Image {image!r} is not in the SpatialData object; available: "
                f"{examples(names, 20) or 'none'}. Pass one of them as image= (or image=None)."
            )
        return image
    in_cs = [
        n for n in names if coordinate_system in get_transformation(sdata.images[n], get_all=True)
    ]
    for word in ("hires", "lowres"):  # spatialdata-io's Visium names: <id>_hires_image, ...
        named = [n for n in in_cs if word in n.lower()]
        if named:
            return named[0]
    return in_cs[0] if in_cs else None


def _affine_xy(element, coordinate_system: str, what: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    transformations = get_transformation(element, get_all=True)
    if coordinate_system not in transformations:
        raise SpatialDataError(
            f"{what} has no transformation to coordinate system {coordinate_system!r}; it has "
            f"{examples(transformations, 20) or 'none'}. Pass coordinate_system=."
        )
    matrix = transformations[coordinate_system].to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    return np.asarray(matrix, dtype=np.float64)


def _apply(affine: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ affine[:2, :2].T + affine[:2, 2]


def _linear_scale(affine: np.ndarray) -> float:
    """How much the affine scales lengths (exact for similarities, the geometric mean else)."""
    return float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))


# --------------------------------------------------------------------------- #
# geometry of the spots and the image
# --------------------------------------------------------------------------- #


def _element_geometry(element, name: str) -> tuple[pd.Index, np.ndarray, np.ndarray | None]:
    """Instance ids (as strings), (x, y) centres and diameters (None for points) of an element."""
    if hasattr(element, "geometry"):  # shapes: a GeoDataFrame
        kinds = set(element.geometry.geom_type.unique())
        if kinds <= {"Point"}:
            if "radius" not in element.columns:
                raise SpatialDataError(f"Circles {name!r} have no 'radius' column.")
            xy = np.column_stack([element.geometry.x, element.geometry.y])
            diameter = 2.0 * element["radius"].to_numpy(dtype=np.float64)
        else:  # polygons: the centroid, and the diameter of a circle of the same area
            centroids = element.geometry.centroid
            xy = np.column_stack([centroids.x, centroids.y])
            diameter = 2.0 * np.sqrt(element.geometry.area.to_numpy(dtype=np.float64) / np.pi)
        ids = element.index
    else:  # points: a dask DataFrame with x, y columns
        frame = element[["x", "y"]].compute()
        xy, diameter, ids = frame.to_numpy(dtype=np.float64), None, frame.index
    ids = pd.Index(ids.astype(str))
    if ids.has_duplicates:
        raise DuplicateNamesError(
            f"Element {name!r} has repeated instance ids, e.g. "
            f"{examples(ids[ids.duplicated()].unique())}; each spot needs its own."
        )
    return ids, np.asarray(xy, dtype=np.float64), diameter


def pick_level(shapes: list[tuple[int, int]], max_side: int = MAX_IMAGE_SIDE) -> int:
    """The finest pyramid level (by (height, width)) no wider than ``max_side``; else the
    coarsest."""
    for i, shape in enumerate(shapes):
        if max(shape) <= max_side:
            return i
    return len(shapes) - 1


def _image_array(element) -> tuple[np.ndarray, float]:
    """The image as uint8 H x W x 3 (a level at most MAX_IMAGE_SIDE wide) and its pixels per
    level-0 pixel."""
    if hasattr(element, "children"):  # DataTree: multiscale
        levels = [next(iter(element[k].values())) for k in element.children]
    else:
        levels = [element]
    shapes = [(int(a.sizes["y"]), int(a.sizes["x"])) for a in levels]
    i = pick_level(shapes)
    level = levels[i]
    step = int(np.ceil(max(shapes[i]) / MAX_IMAGE_SIDE))  # a single huge level: stride it
    if "c" in level.dims:
        level = level.transpose("c", "y", "x")
        if level.sizes["c"] not in (1, 3, 4):  # fluorescence channels: show the first
            level = level.isel(c=[0])
    level = level.isel(y=slice(None, None, step), x=slice(None, None, step))
    scale = shapes[0][1] / shapes[i][1] * step  # level-0 pixels per pixel of the array
    return to_uint8_rgb(np.asarray(level.values)), 1.0 / scale


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #


def read_spatialdata(
    source,
    *,
    table: str | None = None,
    region: str | None = None,
    image: str | None = None,
    coordinate_system: str = "global",
    library_id: str | None = None,
) -> AnnData:
    """A slide from a SpatialData object or ``.zarr`` store: one table's rows of one region.

    Parameters
    ----------
    source
        A :class:`spatialdata.SpatialData` (e.g. from ``spatialdata_io.visium_hd(path)``) or
        the path of a SpatialData ``.zarr`` store (read, never written).
    table
        Name of the table with the counts; may be omitted when only one table annotates spots.
    region
        The shapes (circles or polygons) or points element whose rows to read; may be omitted
        when the table annotates one such element.
    image
        Tissue image to attach; default: one in ``coordinate_system`` (a name with 'hires',
        then 'lowres', is preferred); None when the store has none.
    coordinate_system
        The coordinate system joining spots and image, and the frame of ``world_affine``.
    library_id
        Key in ``uns['spatial']``; default: the image's name (else the region's).

    Returns
    -------
    A new AnnData, spots x genes, as described in :mod:`napari_stlnmf.io.spatialdata`.

    Raises
    ------
    SpatialDataError
        spatialdata is not installed; unknown table, region, image or coordinate system (the
        message lists the available ones); the table annotates no spots.
    CoordinateError
        Table rows whose instance id is not in the region's element.
    """
    sdata, path = _as_spatialdata(source)
    import anndata as ad

    table_name = _choose_table(sdata, table)
    tab = sdata.tables[table_name]
    region = _choose_region(sdata, tab, table_name, region)
    _, region_key, instance_key = _table_keys(tab, table_name)
    for key in (region_key, instance_key):
        if key not in tab.obs:
            raise SpatialDataError(f"Table {table_name!r} has no obs column {key!r}.")

    rows = np.flatnonzero(tab.obs[region_key].astype(str).to_numpy() == region)
    if len(rows) == 0:
        raise SpatialDataError(f"Table {table_name!r} has no rows of region {region!r}.")
    ids = pd.Index(tab.obs[instance_key].iloc[rows].astype(str).to_numpy())
    if ids.has_duplicates:
        raise DuplicateNamesError(
            f"Table {table_name!r} lists instance(s) {examples(ids[ids.duplicated()].unique())} "
            f"of {region!r} more than once."
        )
    element = sdata[region]
    element_ids, xy, diameter = _element_geometry(element, region)
    where = element_ids.get_indexer(ids)
    if (where < 0).any():
        raise CoordinateError(
            f"{int((where < 0).sum())} of {len(ids)} rows of table {table_name!r} have no "
            f"geometry in {region!r}, e.g. instance ids {examples(ids[where < 0])}. Does "
            f"obs[{instance_key!r}] hold the index of {region!r}?"
        )
    xy, diameter = xy[where], None if diameter is None else diameter[where]

    spots_to_world = _affine_xy(element, coordinate_system, f"Element {region!r}")
    image_name = _choose_image(sdata, image, coordinate_system)
    if image_name is not None:
        image_to_world = _affine_xy(
            sdata.images[image_name], coordinate_system, f"Image {image_name!r}"
        )
        frame = np.linalg.inv(image_to_world) @ spots_to_world  # spots -> level-0 image pixels
        pixels, scalef = _image_array(sdata.images[image_name])
        images = {"hires": pixels}
        scalefactors = {"tissue_hires_scalef": scalef}
    else:
        image_to_world = np.eye(3)
        frame, images, scalefactors = spots_to_world, {}, {}
    spatial = _apply(frame, xy)
    if diameter is not None and np.isfinite(diameter).any():
        scalefactors["spot_diameter_fullres"] = float(np.nanmedian(diameter)) * _linear_scale(frame)
    library_id = library_id or image_name or region

    obs = tab.obs.iloc[rows].copy()
    obs.index = ids
    out = ad.AnnData(X=tab.X[rows], obs=obs, var=tab.var.copy())
    out.obsm[SPATIAL_KEY] = spatial
    for key in (PROPORTIONS_KEY, MRNA_FRACTIONS_KEY):  # saved results come back with the slide
        if isinstance(tab.obsm.get(key), pd.DataFrame):
            out.obsm[key] = tab.obsm[key].iloc[rows].set_axis(ids)
    metadata = {WORLD_AFFINE_KEY: image_to_world, "coordinate_system": coordinate_system}
    out.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }
    out.uns[SOURCE_KEY] = {
        "table": table_name,
        "region": region,
        "region_key": region_key,
        "instance_key": instance_key,
        "coordinate_system": coordinate_system,
        "image": image_name or "",
        "path": path,
    }
    return out


def _read(path: Path, *, library_id: str | None = None, **_other_options: Any) -> AnnData:
    return read_spatialdata(path, library_id=library_id)


FORMAT = SlideFormat(
    name="spatialdata",
    detect=detect,
    read=_read,
    description=(
        f"a SpatialData .zarr store with a table annotating circles, polygons or points "
        f"(needs {INSTALL_HINT})"
    ),
    options=frozenset(),
)


# --------------------------------------------------------------------------- #
# writing results
# --------------------------------------------------------------------------- #


def _result_frames(result) -> tuple[pd.DataFrame, pd.Series | None, pd.Series | None, dict]:
    """Proportions (spots x types), fit error, QC and the slide's source of a result."""
    adata = getattr(result, "adata", None)
    if hasattr(result, "proportions"):  # a DeconvolutionResult
        prop, fit, qc = result.proportions, result.fit_error, result.qc
    elif hasattr(result, "obsm") and PROPORTIONS_KEY in result.obsm:  # its annotated AnnData
        adata = result
        prop = result.obsm[PROPORTIONS_KEY]
        if not isinstance(prop, pd.DataFrame):
            types = (result.uns.get(UNS_KEY) or {}).get("cell_types")
            prop = pd.DataFrame(np.asarray(prop), columns=None if types is None else list(types))
        prop = prop.set_axis(result.obs_names)
        fit, qc = result.obs.get(FIT_ERROR_KEY), result.obs.get(QC_KEY)
    else:
        raise SpatialDataError(
            "result must be what napari_stlnmf.deconvolve returned, or an AnnData with "
            f"obsm[{PROPORTIONS_KEY!r}]."
        )
    source = dict((adata.uns.get(SOURCE_KEY) or {}) if adata is not None else {})
    prop = prop.set_axis(pd.Index(prop.index.astype(str)))
    prop.columns = [str(c) for c in prop.columns]
    return prop, fit, qc, source


def _results_columns(prop: pd.DataFrame, fit, qc, prefix: str) -> pd.DataFrame:
    """One column per type, the dominant type, fit error and QC; index = instance ids."""
    from ..layers import results_table

    table = results_table(prop, fit, qc).set_index("barcode")
    columns = {f"{prefix}{t}": table[t] for t in prop.columns}
    extra = {
        f"{prefix}dominant_type": table["dominant"],
        f"{prefix}fit_error": table["fit_error"],
        f"{prefix}qc": pd.Categorical(table["qc"]),
    }
    clash = sorted(set(columns) & set(extra))
    if clash:
        raise SpatialDataError(
            f"Cell type(s) named like a result column: {examples(clash)}; pass another prefix=."
        )
    out = pd.DataFrame({**columns, **extra}, index=table.index)
    return out


def write_spatialdata_results(
    target,
    result,
    *,
    table: str | None = None,
    region: str | None = None,
    new_table: str | None = None,
    prefix: str = "stlnmf_",
    save: bool | None = None,
):
    """Put a deconvolution's results into a SpatialData table; return the SpatialData.

    Writes ``obsm['stlnmf_proportions']`` (spots x types DataFrame, NaN for rows of other
    regions or without an estimate) and ``obs`` columns ``<prefix><type>`` (one per type),
    ``<prefix>dominant_type``, ``<prefix>fit_error`` and ``<prefix>qc``, so napari-spatialdata
    and spatialdata-plot (``render_shapes(color='stlnmf_<type>')``) colour the spots by them.
    Columns of an earlier run are replaced. The table is a new AnnData: the old object is not
    modified.

    Parameters
    ----------
    target
        A :class:`spatialdata.SpatialData` or the path of a ``.zarr`` store.
    result
        What :func:`napari_stlnmf.deconvolve` returned for a slide read from this store (or its
        ``result.adata``): its ``obs_names`` are the region's instance ids.
    table, region
        Where to write; default: where the slide was read from (``uns['stlnmf_spatialdata']``),
        else as :func:`read_spatialdata` chooses.
    new_table
        Write the results as a new table of this name (annotating the same region; ``X`` = the
        proportions) instead of into ``table``. A table of that name is replaced only if an
        earlier call wrote it.
    prefix
        Prefix of the ``obs`` columns.
    save
        Also write the table to the store. Default: True when ``target`` is a path, False for an
        object (call again with ``save=True`` on a backed object to write it). On disk the table
        is written under a temporary name first and then moved in place: a failed write leaves
        the store as it was.

    Raises
    ------
    SpatialDataError
        spatialdata is missing; unknown table/region; the result's spots are not the region's
        instances; ``save=True`` on an object not backed by a store.
    """
    sdata, path = _as_spatialdata(target)
    from spatialdata.models import TableModel

    prop, fit, qc, source = _result_frames(result)
    table_name = _choose_table(sdata, table or source.get("table") or None)
    tab = sdata.tables[table_name]
    region = _choose_region(sdata, tab, table_name, region or source.get("region") or None)
    _, region_key, instance_key = _table_keys(tab, table_name)

    in_region = tab.obs[region_key].astype(str).to_numpy() == region
    ids = tab.obs[instance_key].astype(str).to_numpy()
    unknown = prop.index[~prop.index.isin(ids[in_region])]
    if len(unknown):
        raise SpatialDataError(
            f"{len(unknown)} of {len(prop)} spots of the result are no instance of {region!r} in "
            f"table {table_name!r}, e.g. {examples(unknown)}. Was the slide read from this store?"
        )
    columns = _results_columns(prop, fit, qc, prefix)

    if new_table is None:
        name = table_name
        # rows of other regions (or not deconvolved) get NaN / missing
        where = prop.index.get_indexer(ids)
        where[~in_region] = -1  # instance ids repeat across regions
        annotated = tab.copy()
        values = np.full((tab.n_obs, prop.shape[1]), np.nan)
        values[where >= 0] = prop.to_numpy(dtype=np.float64)[where[where >= 0]]
        annotated.obsm[PROPORTIONS_KEY] = pd.DataFrame(
            values, index=annotated.obs_names, columns=list(prop.columns)
        )
        rows = columns.iloc[np.maximum(where, 0)].set_axis(annotated.obs_names)
        rows.loc[where < 0, :] = np.nan
        for col in columns:
            annotated.obs[col] = rows[col].values  # .values keeps the categorical columns
    else:
        name = new_table
        existing = sdata.tables.get(new_table) if new_table in sdata.tables else None
        if existing is not None and not (existing.uns.get(UNS_KEY) or {}).get("results_table"):
            raise SpatialDataError(
                f"Table {new_table!r} exists and was not written by napari-stlnmf; pass another "
                f"new_table= (existing tables: {examples(list(sdata.tables), 20)})."
            )
        annotated = _new_results_table(prop, columns, region, region_key, instance_key)
    # marks what this function wrote (a results table may be replaced by a later call)
    annotated.uns[UNS_KEY] = {
        "cell_types": list(prop.columns),
        "prefix": prefix,
        "results_table": new_table is not None,
    }
    annotated = TableModel.parse(
        annotated, region=region if new_table else tab.uns["spatialdata_attrs"]["region"],
        region_key=region_key, instance_key=instance_key, overwrite_metadata=True,
    )  # fmt: skip

    save = bool(path) if save is None else save
    if save and sdata.path is None:
        raise SpatialDataError(
            "save=True but the SpatialData object is not backed by a store; write it first "
            "with sdata.write(path)."
        )
    if save:
        _replace_table_on_disk(sdata, name, annotated)
    sdata.tables[name] = annotated
    return sdata


def _new_results_table(prop, columns, region, region_key, instance_key):
    import anndata as ad

    obs = columns.copy()
    obs.insert(0, instance_key, obs.index.to_numpy())
    obs.insert(0, region_key, pd.Categorical([region] * len(obs)))
    obs.index = pd.Index([f"{region}-{i}" for i in obs.index])
    out = ad.AnnData(
        X=prop.to_numpy(dtype=np.float32), obs=obs, var=pd.DataFrame(index=list(prop.columns))
    )
    out.obsm[PROPORTIONS_KEY] = pd.DataFrame(
        prop.to_numpy(dtype=np.float64), index=out.obs_names, columns=list(prop.columns)
    )
    return out


def _replace_table_on_disk(sdata, name: str, table) -> None:
    """Write ``table`` as ``tables/<name>`` of the backing store, never leaving it half-written:
    written in full under a staging name, then the folders are swapped and the old one removed."""
    tables = Path(sdata.path) / "tables"
    staging, old = f"{name}_stlnmf_staging", f"{name}_stlnmf_old"
    for leftover in (staging, old):  # from an interrupted earlier call
        if (tables / leftover).exists():
            shutil.rmtree(tables / leftover)
    sdata.tables[staging] = table
    try:
        sdata.write_element(staging)
    finally:
        del sdata.tables[staging]
    if (tables / name).exists():
        os.replace(tables / name, tables / old)
    os.replace(tables / staging, tables / name)
    shutil.rmtree(tables / old, ignore_errors=True)
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()
