"""10x Space Ranger Visium HD output: square bins of one size, or Space Ranger 4's segmented cells.

Accepted folders (names as Space Ranger writes them, and as spatialdata-io's ``visium_hd``
reader follows them)::

    <sample>/outs/binned_outputs/square_002um/  filtered_feature_bc_matrix.h5
                                 square_008um/  filtered_feature_bc_matrix/  (MEX)
                                 square_016um/  spatial/tissue_positions.parquet,
                                                spatial/scalefactors_json.json, images
    <sample>/outs/segmented_outputs/            filtered_feature_cell_matrix.h5 (or MEX),
                                                cell_segmentations.geojson

The sample folder, ``outs/`` or ``binned_outputs/`` read the bins of ``bin_size`` µm (default
8); one ``square_XXXum/`` folder reads its own bins. ``segmented_outputs/`` (or a sample
without binned outputs) reads the segmented cells, placed at their polygons' centroids.
Bins keep ``scalefactors['bin_size_um']`` and ``['microns_per_pixel']``: the graph and the
napari layers take the bins' side in pixels from them (:func:`~.library.square_bin_size`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY
from ..errors import CoordinateError, FileFormatError
from ._util import rows_in_order
from .registry import SlideFormat
from .spaceranger import (
    TenxH5Columns,
    attach_positions,
    find_matrix,
    missing_matrix_message,
    read_10x_matrix,
    read_scalefactors,
    read_tissue_images,
    read_tissue_positions,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "DEFAULT_BIN_SIZE_UM",
    "available_bin_sizes",
    "bin_folder_name",
    "detect",
    "has_bins",
    "read",
]

BINNED_OUTPUTS = "binned_outputs"
SEGMENTED_OUTPUTS = "segmented_outputs"
BIN_PREFIX = "square_"
DEFAULT_BIN_SIZE_UM = 8
CELL_MATRIX_STEM = "filtered_feature_cell_matrix"
CELL_SEGMENTATIONS = "cell_segmentations.geojson"
_BIN_FOLDER = re.compile(r"^square_(\d+)um$")


def bin_folder_name(bin_size_um: int) -> str:
    """Space Ranger's folder of ``bin_size_um`` µm bins: 8 -> 'square_008um'."""
    return f"{BIN_PREFIX}{int(bin_size_um):03d}um"


def _bin_size_of(folder: Path) -> int | None:
    found = _BIN_FOLDER.match(folder.name)
    return None if found is None else int(found.group(1))


def _is_bin_folder(folder: Path) -> bool:
    return _bin_size_of(folder) is not None and folder.is_dir()


def available_bin_sizes(binned: Path) -> list[int]:
    """Bin sizes (µm) of the ``square_XXXum/`` folders of ``binned``, smallest first."""
    if not binned.is_dir():
        return []
    return sorted(size for d in binned.iterdir() if (size := _bin_size_of(d)) and d.is_dir())


def _candidates(path: Path, name: str) -> Path | None:
    """``path`` itself if it is called ``name``, else ``path/name`` or ``path/outs/name``."""
    for candidate in (path, path / name, path / "outs" / name):
        if candidate.name == name and candidate.is_dir():
            return candidate
    return None


def _find_binned_outputs(path: Path) -> Path | None:
    binned = _candidates(path, BINNED_OUTPUTS)
    return binned if binned is not None and available_bin_sizes(binned) else None


def _find_segmented_outputs(path: Path) -> Path | None:
    segmented = _candidates(path, SEGMENTED_OUTPUTS)
    if segmented is None or find_matrix(segmented, CELL_MATRIX_STEM) is None:
        return None
    return segmented


def _sample_folder(folder: Path) -> Path:
    """The sample folder above ``binned_outputs/`` or ``segmented_outputs/``: the parent of
    ``outs/``, or (outputs unpacked elsewhere) the folder that holds them."""
    parent = folder.parent
    return parent.parent if parent.name == "outs" else parent


def detect(path: Path) -> bool:
    """One ``square_XXXum/`` folder, or a folder with ``binned_outputs/`` or
    ``segmented_outputs/`` in it or in its ``outs/`` (folder listings only)."""
    try:
        if _is_bin_folder(path):
            return find_matrix(path) is not None
        return _find_binned_outputs(path) is not None or _find_segmented_outputs(path) is not None
    except OSError:  # unreadable folder: not ours
        return False


def has_bins(path: Path) -> bool:
    """Whether reading ``path`` gives Visium HD bins (so that a bin size applies): one
    ``square_XXXum/`` folder, or a folder with ``binned_outputs/`` (cheap, like ``detect``)."""
    try:
        if _is_bin_folder(path):
            return True
        return path.name != SEGMENTED_OUTPUTS and _find_binned_outputs(path) is not None
    except OSError:
        return False


def _check_bin_size(bin_size: Any) -> int:
    try:
        value = float(bin_size)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value > 0 and value.is_integer()):
        raise FileFormatError(
            f"bin_size must be a whole number of micrometres (Space Ranger writes 2, 8 and "
            f"16 µm bins, and others when asked), not {bin_size!r}."
        )
    return int(value)


def _choose_bin_folder(path: Path, bin_size: Any) -> Path:
    """The ``square_XXXum/`` folder to read for ``path`` and ``bin_size`` (None: 8 µm, or the
    folder's own size when ``path`` is one bin folder)."""
    if _is_bin_folder(path):
        own = _bin_size_of(path)
        if bin_size is not None and _check_bin_size(bin_size) != own:
            raise FileFormatError(
                f"{str(path)!r} holds the {own} µm bins, not {_check_bin_size(bin_size)} µm: "
                f"open its parent folder {str(path.parent)!r} to choose the bin size, or "
                "leave bin_size unset."
            )
        return path
    binned = _find_binned_outputs(path)
    if binned is None:
        raise FileFormatError(
            f"{str(path)!r} has no Visium HD {BINNED_OUTPUTS}/ with square_XXXum/ folders, in "
            "it or in outs/."
        )
    wanted = DEFAULT_BIN_SIZE_UM if bin_size is None else _check_bin_size(bin_size)
    present = available_bin_sizes(binned)
    if wanted not in present:
        sizes = ", ".join(str(s) for s in present)
        raise FileFormatError(
            f"{str(binned)!r} has no {wanted} µm bins ({bin_folder_name(wanted)}/); the bin "
            f"sizes present are {sizes} µm. Pass bin_size= one of them (CLI: --bin-size)."
        )
    return binned / bin_folder_name(wanted)


def _bin_scalefactors(spatial_dir: Path, bin_size_um: int, where: Path) -> dict[str, Any]:
    """The bins' scale factors, with ``bin_size_um`` and ``microns_per_pixel`` always set and
    ``spot_diameter_fullres`` the bin side in full-resolution pixels (as Space Ranger writes)."""
    scalefactors = read_scalefactors(spatial_dir)
    stored = scalefactors.get("bin_size_um")
    if stored is not None and not np.isclose(float(stored), bin_size_um):
        raise FileFormatError(
            f"{str(spatial_dir / 'scalefactors_json.json')!r} says bin_size_um={stored} but "
            f"the folder {where.name} holds {bin_size_um} µm bins: were files mixed up?"
        )
    scalefactors["bin_size_um"] = float(bin_size_um)
    side_px = scalefactors.get("spot_diameter_fullres")
    if "microns_per_pixel" not in scalefactors and side_px:
        scalefactors["microns_per_pixel"] = bin_size_um / float(side_px)
    if "microns_per_pixel" not in scalefactors:
        raise FileFormatError(
            f"{str(spatial_dir)!r} gives neither microns_per_pixel nor spot_diameter_fullres in "
            "scalefactors_json.json, so the bins cannot be placed at their size. Copy the "
            "spatial/ folder again from the Space Ranger output."
        )
    mpp = float(scalefactors["microns_per_pixel"])
    scalefactors["spot_diameter_fullres"] = bin_size_um / mpp
    return scalefactors


def _read_bins(folder: Path, library_id: str | None) -> AnnData:
    matrix = find_matrix(folder)
    if matrix is None:
        raise FileFormatError(missing_matrix_message(folder) + ".")
    adata = read_10x_matrix(matrix)
    _place_bins(adata, folder, matrix, library_id)
    return adata


def open_bins(
    path: Path, *, bin_size: float | None = None, library_id: str | None = None
) -> tuple[AnnData, TenxH5Columns]:
    """A Visium HD folder's bins without their counts (``X`` None; positions, images and
    scale factors as :func:`read` gives them) and the reader of their counts: a slide read a
    tile at a time (:func:`napari_stlnmf.tiling.deconvolve_tiled`)."""
    folder = _choose_bin_folder(Path(path), bin_size)
    matrix = find_matrix(folder)
    if matrix is None:
        raise FileFormatError(missing_matrix_message(folder) + ".")
    if matrix.is_dir():
        raise FileFormatError(
            f"{str(matrix)!r} is a MEX folder, which cannot be read a tile at a time: copy "
            "filtered_feature_bc_matrix.h5 from the Space Ranger output next to it."
        )
    reader = TenxH5Columns(matrix)
    adata, reader.adata = reader.adata, None
    _place_bins(adata, folder, matrix, library_id)
    return adata, reader


def _place_bins(adata: AnnData, folder: Path, matrix: Path, library_id: str | None) -> None:
    """The bins' positions into ``obs``/``obsm`` and their images and scale factors into
    ``uns['spatial']``."""
    bin_size_um = _bin_size_of(folder)
    metadata = adata.uns.pop("_10x_metadata")
    spatial_dir = folder / "spatial"
    if not spatial_dir.is_dir():
        raise CoordinateError(
            f"{str(folder)!r} has no spatial/ folder with tissue_positions.parquet; copy it "
            "with the matrix from the Space Ranger output."
        )
    attach_positions(adata, read_tissue_positions(spatial_dir), matrix, spatial_dir)
    binned = folder.parent
    sample = _sample_folder(binned)
    metadata["bin_size_um"] = bin_size_um
    adata.uns["spatial"] = {
        library_id or sample.name: {
            # each bin folder has its own images; outs/spatial/ holds them too
            "images": read_tissue_images(spatial_dir, binned.parent / "spatial"),
            "scalefactors": _bin_scalefactors(spatial_dir, bin_size_um, folder),
            "metadata": metadata,
        }
    }


# --------------------------------------------------------------------------- #
# segmented cells (Space Ranger 4)
# --------------------------------------------------------------------------- #


def _polygon_centroid_area(ring: np.ndarray) -> tuple[float, float, float]:
    """Centroid (x, y) and area of a polygon ring (shoelace formula)."""
    x, y = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = 0.5 * cross.sum()
    if abs(area) < 1e-12:  # degenerate outline: its mean point
        return float(x.mean()), float(y.mean()), 0.0
    cx = ((x + x1) * cross).sum() / (6 * area)
    cy = ((y + y1) * cross).sum() / (6 * area)
    return float(cx), float(cy), float(abs(area))


def _outer_ring(geometry: dict) -> np.ndarray:
    """The outline of a Polygon, or of a MultiPolygon's largest part."""
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        return np.asarray(coords[0], dtype=np.float64)[:, :2]
    if kind == "MultiPolygon":
        rings = [np.asarray(part[0], dtype=np.float64)[:, :2] for part in coords]
        return max(rings, key=lambda r: _polygon_centroid_area(r)[2])
    raise ValueError(f"geometry type {kind!r} is not a polygon")


def read_cell_segmentations(path: Path) -> pd.DataFrame:
    """Cells of a Space Ranger ``cell_segmentations.geojson``: x, y (polygon centroid),
    ``cell_area`` (px²) and ``cell_diameter`` (diameter of the disc of that area, px), in
    full-resolution pixels, indexed by the matrix's barcode (``cellid_000000001-1``)."""
    try:
        features = json.loads(path.read_text())["features"]
        rows = {}
        for feature in features:
            cell_id = int(feature["properties"]["cell_id"])
            rows[f"cellid_{cell_id:09d}-1"] = _polygon_centroid_area(
                _outer_ring(feature["geometry"])
            )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(f"Cannot read {str(path)!r} as GeoJSON: {err}.") from err
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise FileFormatError(
            f"{str(path)!r} is not a Space Ranger cell segmentation (cell polygons with a "
            f"'cell_id' property): {err!r}."
        ) from err
    cells = pd.DataFrame.from_dict(rows, orient="index", columns=["x", "y", "cell_area"])
    cells["cell_diameter"] = 2.0 * np.sqrt(cells["cell_area"] / np.pi)
    return cells


def _read_cells(segmented: Path, library_id: str | None) -> AnnData:
    matrix = find_matrix(segmented, CELL_MATRIX_STEM)
    if matrix is None:
        raise FileFormatError(missing_matrix_message(segmented, CELL_MATRIX_STEM) + ".")
    outlines = segmented / CELL_SEGMENTATIONS
    if not outlines.is_file():
        raise CoordinateError(
            f"{str(segmented)!r} has no {CELL_SEGMENTATIONS}, which places the cells; copy it "
            "with the matrix from the Space Ranger output."
        )
    adata = read_10x_matrix(matrix)
    metadata = adata.uns.pop("_10x_metadata")
    cells = read_cell_segmentations(outlines)
    cells = rows_in_order(
        cells,
        adata.obs_names,
        f"cells of {matrix.name} have no outline in {outlines.name}",
        "Are both from the same Space Ranger run?",
    )
    adata.obs["cell_area"] = cells["cell_area"].to_numpy()
    adata.obs["cell_diameter"] = cells["cell_diameter"].to_numpy()
    adata.obsm[SPATIAL_KEY] = cells[["x", "y"]].to_numpy(dtype=np.float64)
    outs = segmented.parent
    scalefactors = read_scalefactors(segmented / "spatial") or read_scalefactors(outs / "spatial")
    # cells are drawn (and their image windows taken) at their median size, not a bin's
    scalefactors.pop("bin_size_um", None)
    scalefactors["spot_diameter_fullres"] = float(np.median(adata.obs["cell_diameter"]))
    metadata["segmentation"] = CELL_SEGMENTATIONS
    adata.uns["spatial"] = {
        library_id or _sample_folder(segmented).name: {
            "images": read_tissue_images(segmented / "spatial", outs / "spatial"),
            "scalefactors": scalefactors,
            "metadata": metadata,
        }
    }
    return adata


def read(
    path: Path,
    *,
    bin_size: float | None = None,
    library_id: str | None = None,
    **_other_options: Any,
) -> AnnData:
    """Read Visium HD bins of ``bin_size`` µm (default 8), or segmented cells (a
    ``segmented_outputs/`` folder, or a sample that has no binned outputs)."""
    segmented = _find_segmented_outputs(path)
    reads_cells = path.name == SEGMENTED_OUTPUTS or (
        segmented is not None and not _is_bin_folder(path) and _find_binned_outputs(path) is None
    )
    if reads_cells:
        if segmented is None:
            raise FileFormatError(
                missing_matrix_message(path, CELL_MATRIX_STEM)
                + f" (Space Ranger 4 writes it with {CELL_SEGMENTATIONS})."
            )
        if bin_size is not None:
            raise FileFormatError(
                f"{str(segmented)!r} holds segmented cells, not bins: leave bin_size unset, or "
                f"open {BINNED_OUTPUTS}/ for bins of {bin_size} µm."
            )
        return _read_cells(segmented, library_id)
    return _read_bins(_choose_bin_folder(path, bin_size), library_id)


FORMAT = SlideFormat(
    name="visium_hd",
    detect=detect,
    read=read,
    description=(
        "a 10x Space Ranger Visium HD folder (the sample, outs/, binned_outputs/ or one "
        "square_XXXum/ folder; bin_size chooses the bins, 8 µm by default; or "
        "segmented_outputs/ for segmented cells)"
    ),
    options=frozenset({"bin_size"}),
)
