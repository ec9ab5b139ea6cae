"""Read and check spatial slides and single-cell references.

Pure compute-core module: no Qt or napari import. Slides come back as
:class:`~anndata.AnnData` objects following the scanpy/squidpy layout:

- ``X``: counts, spots x genes (float32 CSR for slides read from 10x or tables);
- ``obsm['spatial']``: (x, y) spot centres in full-resolution image pixels
  (or in the coordinate units of the input table);
- ``uns['spatial'][library_id]``: ``{'images': {'hires'|'lowres': uint8 HxWx3},
  'scalefactors': {...}, 'metadata': {...}}``, where image pixel =
  ``obsm['spatial'] * scalefactors['tissue_<key>_scalef']``.

The user's objects and files are never modified: readers return new objects and
the ``validate_*`` / ``check_*`` functions only read.
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree

from ._constants import SPATIAL_KEY
from .errors import (
    CellTypeKeyError,
    CoordinateError,
    DuplicateNamesError,
    EmptyCellTypeError,
    FileFormatError,
    ImageMismatchError,
    InvalidCountsError,
    StlnmfError,
)

__all__ = [
    "check_image_covers_spots",
    "get_image",
    "get_library",
    "read_reference",
    "read_slide",
    "reference_columns",
    "validate_reference",
    "validate_slide",
]

_TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_MATRIX_H5 = "filtered_feature_bc_matrix.h5"
_POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
# (x, y) column pairs accepted in coordinate tables, in order of preference.
_XY_COLUMNS = [
    ("x", "y"),
    ("pxl_col_in_fullres", "pxl_row_in_fullres"),
    ("imagecol", "imagerow"),
]
# Visium spots are 55 µm wide on a 100 µm pitch.
_SPOT_DIAMETER_PER_PITCH = 0.55
# Bounds for a column to be offered as a cell-type annotation.
_MIN_TYPES, _MAX_TYPES = 2, 1000
_LIKELY_TYPE_COLUMNS = (
    "cell_type",
    "celltype",
    "cell_types",
    "cell_type_original",
    "celltype_major",
    "celltype_minor",
    "annotation",
    "cell_annotation",
    "labels",
    "label",
    "cluster",
    "clusters",
)
_N_EXAMPLES = 5

_SUPPORTED_SLIDES = (
    "an .h5ad file with obsm['spatial']; "
    "a 10x Space Ranger 'outs' folder (or the folder containing it) with "
    f"{_MATRIX_H5} and spatial/tissue_positions[_list].csv; "
    "or a counts table (.csv, .tsv, .txt, optionally .gz; spots x genes, spot ids "
    "in the first column) together with coords="
)


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def _examples(values: Sequence[Any] | np.ndarray | pd.Index, n: int = _N_EXAMPLES) -> str:
    """Format up to ``n`` values for an error message."""
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:n])
    return shown + (", ..." if len(values) > n else "")


def _table_suffix(path: Path) -> str | None:
    """Return the table suffix ('.csv', '.tsv', '.txt') of ``path``, ignoring '.gz'."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _TABLE_SUFFIXES:
        return suffixes[-1]
    return None


def _stem(path: Path) -> str:
    """File name without table/compression suffixes ('counts.csv.gz' -> 'counts')."""
    name = path.name
    for suffix in (".gz", *_TABLE_SUFFIXES, ".h5ad"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _sniff_sep(path: Path) -> str:
    """Guess the delimiter from the header line (pandas' own sniffer is slow on wide tables)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt") as fh:
        header = fh.readline()
    for sep in ("\t", ",", ";"):
        if sep in header:
            return sep
    return r"\s+"


def _read_table(path: Path, sep: str | None) -> pd.DataFrame:
    """Read a delimited table with the first column as string index."""
    if sep is None:
        sep = _sniff_sep(path)
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        raise FileFormatError(f"Cannot read {str(path)!r} as a delimited table: {err}") from err
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return df


def _require_numeric(df: pd.DataFrame, path: Path, what: str) -> None:
    """Raise FileFormatError naming the non-numeric columns of ``df``."""
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise FileFormatError(
            f"{what} {str(path)!r} has {len(bad)} non-numeric column(s): {_examples(bad)}. "
            "Expected the ids in the first column and only numbers elsewhere; "
            "remove annotation columns (e.g. a trailing gene-name column) first."
        )


def _decode(values: np.ndarray) -> list[str]:
    """Decode an HDF5 byte-string array to Python strings."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Convert grey, RGBA, channel-first, 16-bit or float images to uint8 HxWx3."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = np.moveaxis(img, 0, -1)  # channel-first TIFFs
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise FileFormatError(
            f"Expected a 2-D grey or RGB(A) image (H x W [x 3|4]), got shape {img.shape}."
        )
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = img[..., :3]
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    img = img.astype(np.float64)
    finite = img[np.isfinite(img)]
    top = float(finite.max()) if finite.size else 0.0
    if np.issubdtype(np.asarray(image).dtype, np.floating) and top <= 1.0:
        scale = 255.0  # float images in [0, 1]
    elif top > 255:
        scale = 255.0 / top  # 16-bit and other wide ranges
    else:
        scale = 1.0
    return np.clip(np.nan_to_num(img * scale), 0, 255).astype(np.uint8)


def _read_image(path: Path) -> np.ndarray:
    """Read a PNG/JPEG/TIFF image as uint8 HxWx3."""
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            pass
        else:
            return _to_uint8_rgb(tifffile.imread(path, level=0, series=0))
    from PIL import Image

    # Full-resolution histology easily exceeds PIL's decompression-bomb limit;
    # the file was chosen by the user, so lift the limit for this read only.
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
    except OSError as err:
        raise FileFormatError(f"Cannot read image {str(path)!r}: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return _to_uint8_rgb(arr)


def _estimate_spot_diameter(xy: np.ndarray) -> float | None:
    """Median nearest-neighbour distance times the Visium diameter/pitch ratio."""
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    if len(xy) < 2:
        return None
    dist, _ = cKDTree(xy).query(xy, k=2)
    nn = dist[:, 1]
    nn = nn[nn > 0]  # duplicated positions would give 0
    if nn.size == 0:
        return None
    return float(np.median(nn) * _SPOT_DIAMETER_PER_PITCH)


# --------------------------------------------------------------------------- #
# 10x Space Ranger
# --------------------------------------------------------------------------- #


def _find_outs(path: Path) -> Path | None:
    """Return the Space Ranger 'outs' folder for ``path``, or None if it is not one."""
    for candidate in (path, path / "outs"):
        if _find_matrix_h5(candidate) is not None:
            return candidate
    return None


def _find_matrix_h5(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    exact = folder / _MATRIX_H5
    if exact.is_file():
        return exact
    # 10x public datasets prefix the sample name, e.g. V1_Heart_filtered_feature_bc_matrix.h5
    matches = sorted(folder.glob(f"*{_MATRIX_H5}"))
    return matches[0] if len(matches) == 1 else None


def _read_10x_h5(path: Path) -> ad.AnnData:
    """Read a 10x feature-barcode HDF5 matrix (CSC over barcodes) as spots x genes."""
    with h5py.File(path, "r") as f:
        if "matrix" in f:
            grp = f["matrix"]
            feats = grp["features"]
            names = _decode(feats["name"][:])
            ids = _decode(feats["id"][:])
            ftype = _decode(feats["feature_type"][:]) if "feature_type" in feats else None
        else:
            # Cell Ranger 2 layout: one group per genome with genes/gene_names.
            groups = [k for k in f if isinstance(f[k], h5py.Group)]
            if len(groups) != 1 or "gene_names" not in f[groups[0]]:
                raise FileFormatError(
                    f"{str(path)!r} is not a 10x feature-barcode matrix: no 'matrix' group."
                )
            grp = f[groups[0]]
            names = _decode(grp["gene_names"][:])
            ids = _decode(grp["genes"][:])
            ftype = None
        n_genes, n_barcodes = (int(v) for v in grp["shape"][:])
        genes_by_barcodes = sparse.csc_matrix(
            (grp["data"][:], grp["indices"][:], grp["indptr"][:]), shape=(n_genes, n_barcodes)
        )
        barcodes = _decode(grp["barcodes"][:])
        metadata = {
            key: (val.decode() if isinstance(val, bytes) else str(val))
            for key, val in f.attrs.items()
            if key in ("chemistry_description", "software_version")
        }
    X = sparse.csr_matrix(genes_by_barcodes.T, dtype=np.float32)
    var = pd.DataFrame({"gene_ids": ids}, index=pd.Index(names))
    if ftype is not None:
        var["feature_types"] = ftype
        keep = var["feature_types"].to_numpy() == "Gene Expression"
        if keep.any():  # antibody/CRISPR rows are not genes
            X = X[:, keep]
            var = var.loc[keep]
    # Same result as AnnData.var_names_make_unique, without the constructor's warning.
    var.index = ad.utils.make_index_unique(var.index.astype(str))
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
    adata.uns["_10x_metadata"] = metadata
    return adata


def _read_tissue_positions(spatial_dir: Path) -> pd.DataFrame:
    """Read Space Ranger spot positions, indexed by barcode."""
    csv_new = spatial_dir / "tissue_positions.csv"
    csv_old = spatial_dir / "tissue_positions_list.csv"
    parquet = spatial_dir / "tissue_positions.parquet"
    if csv_new.is_file() or csv_old.is_file():
        return _read_positions_csv(csv_new if csv_new.is_file() else csv_old)
    if parquet.is_file():
        try:
            pos = pd.read_parquet(parquet)
        except ImportError as err:
            raise FileFormatError(
                f"Reading {str(parquet)!r} needs pyarrow or fastparquet "
                "(`pip install pyarrow`), or convert it to tissue_positions.csv."
            ) from err
        return _finish_positions(pos, parquet)
    raise CoordinateError(
        f"No spot positions in {str(spatial_dir)!r}: expected spatial/tissue_positions.csv "
        "(Space Ranger >= 2.0), spatial/tissue_positions_list.csv (older) or "
        "spatial/tissue_positions.parquet."
    )


def _read_positions_csv(path: Path) -> pd.DataFrame:
    # Decide on the header from the first line itself: guessing with header=0 on a
    # header-less file silently turns the first spot into column names.
    with open(path) as fh:
        first = fh.readline().strip().split(",")
    has_header = "in_tissue" in first or "barcode" in first
    pos = pd.read_csv(path, header=0 if has_header else None)
    if not has_header:
        if pos.shape[1] != len(_POSITION_COLUMNS):
            raise FileFormatError(
                f"{str(path)!r} has {pos.shape[1]} columns and no header; expected "
                f"{len(_POSITION_COLUMNS)}: {', '.join(_POSITION_COLUMNS)}."
            )
        pos.columns = _POSITION_COLUMNS
    return _finish_positions(pos, path)


def _finish_positions(pos: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in _POSITION_COLUMNS if c not in pos.columns]
    if missing and "barcode" not in pos.columns and pos.index.name == "barcode":
        pos = pos.reset_index()
        missing = [c for c in _POSITION_COLUMNS if c not in pos.columns]
    if missing:
        raise FileFormatError(
            f"{str(path)!r} lacks column(s) {_examples(missing)}; expected "
            f"{', '.join(_POSITION_COLUMNS)}."
        )
    pos = pos.set_index(pos["barcode"].astype(str)).drop(columns="barcode")
    if pos.index.has_duplicates:
        dups = pos.index[pos.index.duplicated()].unique()
        raise DuplicateNamesError(
            f"{str(path)!r} lists {len(dups)} barcode(s) more than once, e.g. {_examples(dups)}."
        )
    return pos


def _read_visium(outs: Path, library_id: str | None) -> ad.AnnData:
    h5 = _find_matrix_h5(outs)
    assert h5 is not None  # checked by the caller
    adata = _read_10x_h5(h5)
    metadata = adata.uns.pop("_10x_metadata")
    spatial_dir = outs / "spatial"
    pos = _read_tissue_positions(spatial_dir)

    barcodes = adata.obs_names
    missing = barcodes[~barcodes.isin(pos.index)]
    if len(missing):
        raise CoordinateError(
            f"{len(missing)} of {adata.n_obs} barcodes of {h5.name} have no position in "
            f"{str(spatial_dir)!r}, e.g. {_examples(missing)}. Are the matrix and the "
            "spatial/ folder from the same Space Ranger run?"
        )
    pos = pos.loc[barcodes]  # matrix order, drops positions of spots not in the matrix
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy()
    adata.obsm[SPATIAL_KEY] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
        dtype=np.float64
    )

    if library_id is None:
        library_id = outs.parent.name if outs.name == "outs" else outs.name
    scalefactors: dict[str, Any] = {}
    sf_path = spatial_dir / "scalefactors_json.json"
    if sf_path.is_file():
        scalefactors = json.loads(sf_path.read_text())
    images = {}
    for key in ("hires", "lowres"):
        img_path = spatial_dir / f"tissue_{key}_image.png"
        if img_path.is_file():
            images[key] = _read_image(img_path)
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }
    return adata


# --------------------------------------------------------------------------- #
# counts tables
# --------------------------------------------------------------------------- #


def _pick_xy(df: pd.DataFrame, source: str) -> tuple[str, str]:
    lower = {str(c).lower(): c for c in df.columns}
    for x, y in _XY_COLUMNS:
        if x in lower and y in lower:
            return lower[x], lower[y]
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    if len(df.columns) == 2 and len(numeric) == 2:
        return numeric[0], numeric[1]
    accepted = ", ".join(f"{x}/{y}" for x, y in _XY_COLUMNS)
    raise CoordinateError(
        f"Cannot find spot coordinates in {source}: expected columns {accepted}; "
        f"found {_examples(df.columns, 10)}."
    )


def _read_coords(coords: Any, sep: str | None) -> pd.DataFrame | np.ndarray:
    """Return coordinates as a DataFrame with 'x', 'y' first, or an (n, 2) array."""
    if isinstance(coords, (str, Path)):
        path = Path(coords)
        if not path.is_file():
            raise FileNotFoundError(f"Coordinates file {str(path)!r} does not exist.")
        if path.name.startswith("tissue_positions"):
            df = _read_positions_csv(path)
        else:
            df = _read_table(path, sep)
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
            f"{source} lists {len(dups)} spot id(s) more than once, e.g. {_examples(dups)}."
        )
    xy = df[[xcol, ycol]].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    xy.columns = ["x", "y"]
    extra = df.drop(columns=[xcol, ycol])
    return pd.concat([xy, extra], axis=1)


def _align_counts(
    counts: pd.DataFrame, coords: pd.DataFrame | np.ndarray, path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Put counts and coordinates in the same spot order (transposing counts if needed)."""
    if isinstance(coords, np.ndarray):
        if len(coords) != counts.shape[0] and len(coords) == counts.shape[1]:
            warnings.warn(
                f"{path.name}: {counts.shape[1]} columns match the {len(coords)} coordinates, "
                "so the table was read as genes x spots and transposed.",
                UserWarning,
                stacklevel=3,
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
        if in_cols.all() and not in_rows.any():
            warnings.warn(
                f"{path.name}: the column names, not the row ids, match the spot ids in coords, "
                "so the table was read as genes x spots and transposed.",
                UserWarning,
                stacklevel=3,
            )
            counts = counts.T
        else:
            missing = counts.index[~in_rows]
            raise CoordinateError(
                f"{len(missing)} of {counts.shape[0]} spots in {path.name} have no coordinates, "
                f"e.g. {_examples(missing)}; coords ids look like {_examples(coords.index)}. "
                "The first column of both files must hold the same spot ids."
            )
    return counts, coords.loc[counts.index]


def _read_counts_table(
    path: Path,
    *,
    coords: Any,
    image: Any,
    scalefactor: float,
    spot_diameter: float | None,
    library_id: str | None,
    sep: str | None,
) -> ad.AnnData:
    if coords is None:
        raise CoordinateError(
            f"A counts table ({path.name}) has no spot positions: pass coords= (a CSV with the "
            "spot id first and columns x, y; a DataFrame; or an (n_spots, 2) array)."
        )
    if not (np.isfinite(scalefactor) and scalefactor > 0):
        raise ImageMismatchError(
            f"scalefactor must be a positive number of image pixels per coordinate unit, "
            f"got {scalefactor!r}."
        )
    counts = _read_table(path, sep)
    xy = _read_coords(coords, sep)
    counts, xy = _align_counts(counts, xy, path)
    _require_numeric(counts, path, "Counts table")

    obs = xy.drop(columns=["x", "y"]).copy()
    obs.index.name = None
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=obs,
        var=pd.DataFrame(index=counts.columns.copy()),
    )
    adata.obsm[SPATIAL_KEY] = xy[["x", "y"]].to_numpy(dtype=np.float64)

    if spot_diameter is None:
        spot_diameter = _estimate_spot_diameter(adata.obsm[SPATIAL_KEY])
    scalefactors: dict[str, Any] = {}
    if spot_diameter is not None:
        scalefactors["spot_diameter_fullres"] = float(spot_diameter)
    images = {}
    metadata: dict[str, Any] = {}
    if image is not None:
        if isinstance(image, (str, Path)):
            images["hires"] = _read_image(Path(image))
            metadata["source_image_path"] = str(image)
        else:
            images["hires"] = _to_uint8_rgb(np.array(image))
        scalefactors["tissue_hires_scalef"] = float(scalefactor)
    if library_id is None:
        library_id = _stem(path)
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }
    return adata


# --------------------------------------------------------------------------- #
# public readers
# --------------------------------------------------------------------------- #


def read_slide(
    path: str | Path,
    *,
    coords: str | Path | pd.DataFrame | np.ndarray | None = None,
    image: str | Path | np.ndarray | None = None,
    scalefactor: float = 1.0,
    spot_diameter: float | None = None,
    library_id: str | None = None,
    sep: str | None = None,
) -> ad.AnnData:
    """Read a spatial transcriptomics slide.

    Parameters
    ----------
    path
        One of

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
        Spot diameter in coordinate units. Default: 0.55 times the median
        nearest-neighbour distance (the Visium diameter/pitch ratio).
    library_id
        Key in ``uns['spatial']``. Default: the sample folder name for Space
        Ranger output, the file name without suffixes for a table.
    sep
        Delimiter of the counts and coords tables. Default: guessed from the header.

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
            f"{str(path)!r} does not exist. Supported inputs: {_SUPPORTED_SLIDES}."
        )

    if path.is_dir():
        outs = _find_outs(path)
        if outs is None:
            raise FileFormatError(
                f"{str(path)!r} is a folder without {_MATRIX_H5} (looked in it and in outs/). "
                f"Supported inputs: {_SUPPORTED_SLIDES}."
            )
        return _read_visium(outs, library_id)

    if path.suffix.lower() == ".h5ad":
        adata = ad.read_h5ad(path)
        if coords is not None:
            xy = _read_coords(coords, sep)
            if isinstance(xy, np.ndarray):
                if len(xy) != adata.n_obs:
                    raise CoordinateError(
                        f"coords has {len(xy)} rows but {path.name} has {adata.n_obs} spots."
                    )
            else:
                missing = adata.obs_names[~adata.obs_names.isin(xy.index)]
                if len(missing):
                    raise CoordinateError(
                        f"{len(missing)} of {adata.n_obs} spots of {path.name} have no "
                        f"coordinates, e.g. {_examples(missing)}."
                    )
                xy = xy.loc[adata.obs_names, ["x", "y"]].to_numpy(dtype=np.float64)
            adata.obsm[SPATIAL_KEY] = xy
        if SPATIAL_KEY not in adata.obsm:
            raise CoordinateError(
                f"{path.name} has no obsm[{SPATIAL_KEY!r}]; it must hold an (n_spots, 2) array "
                "of (x, y) spot centres in full-resolution image pixels. Available obsm keys: "
                f"{_examples(adata.obsm.keys(), 20) or 'none'}. Set it with "
                "`adata.obsm['spatial'] = adata.obs[['x', 'y']].to_numpy()` or pass coords=."
            )
        return adata

    if _table_suffix(path) is not None:
        return _read_counts_table(
            path,
            coords=coords,
            image=image,
            scalefactor=scalefactor,
            spot_diameter=spot_diameter,
            library_id=library_id,
            sep=sep,
        )

    raise FileFormatError(
        f"Cannot read {str(path)!r} as a slide. Supported inputs: {_SUPPORTED_SLIDES}."
    )


def read_reference(
    path: str | Path, *, cell_type_key: str | None = None
) -> ad.AnnData | pd.DataFrame:
    """Read a cell-type reference.

    Parameters
    ----------
    path
        An ``.h5ad`` single-cell reference (cells x genes, counts in ``X``), or a
        signature table (``.csv``, ``.tsv``, ``.txt``, optionally gzipped) with
        genes as rows, cell types as columns and gene names in the first column.
    cell_type_key
        For ``.h5ad`` input, the ``obs`` column holding the cell types; checked
        to exist when given.

    Returns
    -------
    A new :class:`~anndata.AnnData` (``.h5ad``) or a float
    :class:`~pandas.DataFrame` of genes x cell types (table).

    Raises
    ------
    CellTypeKeyError
        ``cell_type_key`` is not an ``obs`` column.
    FileFormatError
        Unsupported file type or non-numeric signature table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Reference file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".h5ad":
        adata = ad.read_h5ad(path)
        if cell_type_key is not None and cell_type_key not in adata.obs.columns:
            raise CellTypeKeyError(_missing_key_message(cell_type_key, adata.obs, path.name))
        return adata
    if _table_suffix(path) is not None:
        sig = _read_table(path, None)
        _require_numeric(sig, path, "Signature table")
        sig = sig.astype(np.float64)
        sig.index.name = None
        return sig
    raise FileFormatError(
        f"Cannot read {str(path)!r} as a reference. Supported: an .h5ad single-cell reference "
        "(cells x genes with a cell-type obs column) or a signature table (.csv/.tsv/.txt, "
        "optionally .gz; genes x cell types, gene names in the first column)."
    )


def _candidate_columns(obs: pd.DataFrame) -> list[str]:
    """Categorical/string obs columns with 2..1000 distinct values, likely names first."""
    found = []
    for col in obs.columns:
        s = obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            n = s.cat.remove_unused_categories().cat.categories.size
        elif pd.api.types.is_string_dtype(s.dtype) or s.dtype == object:
            n = s.dropna().nunique()
        else:
            continue
        if _MIN_TYPES <= n <= _MAX_TYPES:
            found.append(str(col))
    likely = [c for c in found if c.lower() in _LIKELY_TYPE_COLUMNS]
    return likely + [c for c in found if c not in likely]


def _read_obs(path: Path) -> pd.DataFrame:
    """Read only ``obs`` of an .h5ad file (X and layers can be gigabytes)."""
    try:
        try:
            from anndata.io import read_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem
        with h5py.File(path, "r") as f:
            return read_elem(f["obs"])
    except Exception:  # legacy or unusual layouts: let anndata sort them out
        backed = ad.read_h5ad(path, backed="r")
        try:
            return backed.obs.copy()
        finally:
            backed.file.close()


def reference_columns(path: str | Path) -> list[str]:
    """List the ``obs`` columns of an .h5ad reference that could hold cell types.

    Only ``obs`` is read. Candidates are categorical or string columns with
    2 to 1000 distinct values; common names such as ``cell_type`` come first.

    Parameters
    ----------
    path
        An ``.h5ad`` reference, or a signature table.

    Returns
    -------
    Column names; ``[]`` for a signature table (its columns are the types).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Reference file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".h5ad":
        return _candidate_columns(_read_obs(path))
    if _table_suffix(path) is not None:
        return []
    raise FileFormatError(
        f"Cannot read {str(path)!r} as a reference: expected .h5ad or a .csv/.tsv/.txt "
        "signature table."
    )


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #


def _check_unique(index: pd.Index, what: str, fix: str) -> None:
    if index.has_duplicates:
        dups = index[index.duplicated()].unique()
        raise DuplicateNamesError(
            f"{len(dups)} {what} occur more than once, e.g. {_examples(dups)}. {fix}"
        )


def _bad_positions(X: Any, mask_fn) -> tuple[int, np.ndarray, np.ndarray]:
    """Count entries where ``mask_fn`` is true; return (count, rows, cols) of the hits.

    For sparse input only the stored values are inspected, so nothing is densified.
    """
    if sparse.issparse(X):
        coo = sparse.coo_matrix(X)
        mask = mask_fn(coo.data)
        return int(mask.sum()), coo.row[mask], coo.col[mask]
    arr = np.asarray(X)
    mask = mask_fn(arr)
    rows, cols = np.nonzero(mask)
    return len(rows), rows, cols


def _values(X: Any) -> np.ndarray:
    """Stored values of a sparse or dense matrix (no copy for CSR/CSC/dense)."""
    return X.data if sparse.issparse(X) else np.asarray(X)


def _check_counts(
    X: Any,
    row_names: pd.Index,
    col_names: pd.Index,
    what: str,
    units: tuple[str, str] = ("spot", "gene"),
) -> None:
    """Raise InvalidCountsError on non-numeric, non-finite or negative entries.

    ``units`` names the rows and columns in the message.
    """
    if X is None:
        raise InvalidCountsError(f"The {what} has no counts: X is None.")
    vals = _values(X)
    if not (np.issubdtype(vals.dtype, np.number) or vals.dtype == bool):
        raise InvalidCountsError(
            f"The {what} counts have dtype {vals.dtype}; expected numbers. "
            "Convert with `adata.X = adata.X.astype('float32')`."
        )
    checks = []
    if np.issubdtype(vals.dtype, np.inexact):  # integers cannot be NaN/inf
        checks.append(
            (
                lambda a: ~np.isfinite(a),
                "NaN or infinite",
                "Counts must be finite; replace missing values by 0 or drop the affected rows.",
            )
        )
    if not (np.issubdtype(vals.dtype, np.unsignedinteger) or vals.dtype == bool):
        checks.append(
            (
                lambda a: a < 0,
                "negative",
                "Raw (non-negative) counts or mean expression are required; scaled data "
                "(e.g. after sc.pp.scale) cannot be used. Use the raw counts, e.g. from "
                "adata.layers['counts'] or adata.raw.",
            )
        )
    for mask_fn, label, hint in checks:
        if not mask_fn(vals).any():
            continue
        n, rows, cols = _bad_positions(X, mask_fn)
        bad_rows = row_names[np.unique(rows)]
        bad_cols = col_names[np.unique(cols)]
        raise InvalidCountsError(
            f"The {what} has {n} {label} value(s) in {len(bad_rows)} {units[0]}(s) "
            f"(e.g. {_examples(bad_rows)}) and {len(bad_cols)} {units[1]}(s) "
            f"(e.g. {_examples(bad_cols)}). {hint}"
        )


def validate_slide(adata: ad.AnnData, *, coords_key: str = SPATIAL_KEY) -> None:
    """Check that a slide can be deconvolved; raise an actionable error otherwise.

    Checks unique spot and gene names, finite non-negative counts with at least
    one non-zero entry, and finite (x, y) coordinates in ``obsm[coords_key]``.
    Sparse counts are checked through their stored values only. ``adata`` is not
    modified.

    Parameters
    ----------
    adata
        Spots x genes.
    coords_key
        ``obsm`` key of the spot coordinates.

    Raises
    ------
    DuplicateNamesError
        Duplicate barcodes or gene names.
    InvalidCountsError
        Non-numeric, NaN/infinite or negative counts, or no counts at all.
    CoordinateError
        Coordinates missing, of the wrong shape or non-finite.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidCountsError(
            f"The slide is empty ({adata.n_obs} spots x {adata.n_vars} genes)."
        )
    _check_unique(
        adata.obs_names,
        "spot barcode(s)",
        "Spot names must be unique; run `adata.obs_names_make_unique()` "
        "(or check whether two slides were concatenated without a batch key).",
    )
    _check_unique(
        adata.var_names,
        "gene name(s)",
        "Gene names must be unique; run `adata.var_names_make_unique()` or sum the "
        "duplicated genes.",
    )
    _check_counts(adata.X, adata.obs_names, adata.var_names, "slide")
    vals = _values(adata.X)
    if not np.any(vals):
        raise InvalidCountsError(
            f"All {adata.n_obs} spots have zero counts; X looks empty. Check that the "
            "counts were loaded into X (not only into a layer)."
        )

    if coords_key not in adata.obsm:
        raise CoordinateError(
            f"No spot coordinates: obsm[{coords_key!r}] is missing. It must hold an "
            "(n_spots, 2) array of (x, y) spot centres; available obsm keys: "
            f"{_examples(adata.obsm.keys(), 20) or 'none'}."
        )
    try:
        xy = np.asarray(adata.obsm[coords_key], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CoordinateError(f"obsm[{coords_key!r}] is not numeric: {err}") from err
    if xy.ndim != 2 or xy.shape[0] != adata.n_obs or xy.shape[1] < 2:
        raise CoordinateError(
            f"obsm[{coords_key!r}] has shape {xy.shape}; expected ({adata.n_obs}, 2) "
            "holding (x, y) per spot."
        )
    bad = ~np.all(np.isfinite(xy[:, :2]), axis=1)
    if bad.any():
        raise CoordinateError(
            f"{int(bad.sum())} of {adata.n_obs} spots have NaN or infinite coordinates in "
            f"obsm[{coords_key!r}], e.g. {_examples(adata.obs_names[bad])}. "
            "Drop these spots or fix their positions."
        )


def _missing_key_message(key: str | None, obs: pd.DataFrame, source: str = "the reference") -> str:
    candidates = _candidate_columns(obs)
    head = "No cell_type_key given" if key is None else f"Column {key!r} is not in obs of {source}"
    return (
        f"{head}: choose the obs column holding the cell types. Likely candidates: "
        f"{_examples(candidates, 20) or 'none'}; all obs columns: "
        f"{_examples(obs.columns, 30) or 'none'}."
    )


def validate_reference(
    reference: ad.AnnData | pd.DataFrame,
    *,
    cell_type_key: str | None = None,
    min_cells: int = 1,
) -> None:
    """Check a single-cell reference or a signature table; raise an actionable error.

    ``reference`` is not modified.

    Parameters
    ----------
    reference
        Either an :class:`~anndata.AnnData` of cells x genes with counts in ``X``
        and cell types in ``obs[cell_type_key]``, or a
        :class:`~pandas.DataFrame` signature of genes x cell types.
    cell_type_key
        ``obs`` column with the cell types (AnnData only, required there).
    min_cells
        Minimum number of cells per type (AnnData only).

    Raises
    ------
    CellTypeKeyError
        ``cell_type_key`` missing, not in ``obs``, or with fewer than two types.
    EmptyCellTypeError
        A type has fewer than ``min_cells`` cells, or a signature column sums to 0.
    InvalidCountsError
        NaN/infinite or negative values.
    DuplicateNamesError
        Duplicate gene names (or duplicate cell-type columns of a signature).
    """
    if isinstance(reference, ad.AnnData):
        _validate_sc_reference(reference, cell_type_key=cell_type_key, min_cells=min_cells)
    elif isinstance(reference, pd.DataFrame):
        _validate_signature(reference)
    else:
        raise TypeError(
            f"reference must be an AnnData or a pandas DataFrame, got {type(reference).__name__}."
        )


def _validate_sc_reference(adata: ad.AnnData, *, cell_type_key: str | None, min_cells: int) -> None:
    if cell_type_key is None or cell_type_key not in adata.obs.columns:
        raise CellTypeKeyError(_missing_key_message(cell_type_key, adata.obs))
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidCountsError(
            f"The reference is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
        )
    _check_unique(
        adata.var_names,
        "gene name(s)",
        "Gene names must be unique; run `reference.var_names_make_unique()`.",
    )
    labels = adata.obs[cell_type_key]
    sizes = labels.value_counts(dropna=True)  # keeps unused categories with count 0
    n_types = int((sizes > 0).sum())
    if n_types < _MIN_TYPES:
        raise CellTypeKeyError(
            f"obs[{cell_type_key!r}] holds {n_types} cell type(s); at least {_MIN_TYPES} are "
            "needed. Likely cell-type columns: "
            f"{_examples(_candidate_columns(adata.obs), 20) or 'none'}."
        )
    small = sizes[sizes < min_cells]
    if len(small):
        listed = ", ".join(f"{name!r} ({n})" for name, n in small.head(20).items())
        hint = (
            " Zero-cell types are usually unused categories left after subsetting: "
            f"`reference.obs[{cell_type_key!r}] = "
            f"reference.obs[{cell_type_key!r}].cat.remove_unused_categories()`."
            if (small == 0).any()
            else ""
        )
        raise EmptyCellTypeError(
            f"{len(small)} cell type(s) in obs[{cell_type_key!r}] have fewer than {min_cells} "
            f"cell(s): {listed}. Remove or merge them.{hint}"
        )
    _check_counts(adata.X, adata.obs_names, adata.var_names, "reference", ("cell", "gene"))


def _validate_signature(sig: pd.DataFrame) -> None:
    if sig.shape[0] == 0 or sig.shape[1] == 0:
        raise InvalidCountsError(
            f"The signature is empty ({sig.shape[0]} genes x {sig.shape[1]} cell types)."
        )
    bad = [c for c in sig.columns if not pd.api.types.is_numeric_dtype(sig[c])]
    if bad:
        raise InvalidCountsError(
            f"Signature column(s) {_examples(bad)} are not numeric; a signature holds one "
            "numeric column of mean expression per cell type, gene names as index."
        )
    _check_unique(
        pd.Index(sig.index.astype(str)),
        "gene name(s)",
        "Gene names (signature rows) must be unique; sum or drop duplicated genes.",
    )
    _check_unique(
        pd.Index(sig.columns.astype(str)),
        "cell type name(s)",
        "Cell-type columns of the signature must be unique.",
    )
    values = sig.to_numpy(dtype=np.float64)
    _check_counts(
        values,
        pd.Index(sig.index.astype(str)),
        pd.Index(sig.columns.astype(str)),
        "signature",
        ("gene", "cell type"),
    )
    zero = sig.columns[values.sum(axis=0) <= 0]
    if len(zero):
        raise EmptyCellTypeError(
            f"{len(zero)} cell type(s) have no expression in the signature (column sums to 0): "
            f"{_examples(zero)}. Remove these columns."
        )


# --------------------------------------------------------------------------- #
# libraries and images
# --------------------------------------------------------------------------- #


def get_library(adata: ad.AnnData, library_id: str | None = None) -> tuple[str, dict]:
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
                f"{_examples(libraries.keys(), 20)}. Pass library_id= to choose one."
            )
        library_id = next(iter(libraries))
    elif library_id not in libraries:
        raise StlnmfError(
            f"Library {library_id!r} is not in uns['spatial']; available: "
            f"{_examples(libraries.keys(), 20)}."
        )
    return library_id, libraries[library_id]


def get_image(
    adata: ad.AnnData,
    library_id: str | None = None,
    *,
    prefer: Sequence[str] = ("hires", "lowres"),
) -> tuple[np.ndarray, float, float | None] | None:
    """Return the tissue image, its scale factor and the spot diameter.

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
    ``obsm['spatial']`` units (None if unknown); or None when the slide has no
    ``uns['spatial']`` or none of the ``prefer`` images.

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
        diameter = scalefactors.get("spot_diameter_fullres")
        return (
            np.asarray(images[key]),
            float(scalefactors[sf_key]),
            None if diameter is None else float(diameter),
        )
    return None


def check_image_covers_spots(
    adata: ad.AnnData,
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
            f"{_examples(images.keys()) or 'none'}."
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
