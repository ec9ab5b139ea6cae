"""10x Space Ranger (Visium) output: an ``outs/`` folder, or the sample folder holding it.

Reads the filtered matrix (``filtered_feature_bc_matrix.h5``, or the MEX folder
``filtered_feature_bc_matrix/``; gene-expression features only), the spot positions in
``spatial/tissue_positions[_list].csv`` (or ``.parquet``), the scale factors and the
hires/lowres tissue images. The matrix and position readers are shared with
:mod:`.visium_hd`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY
from ..errors import CoordinateError, DuplicateNamesError, FileFormatError
from ._util import examples, rows_in_order
from .images import read_image
from .registry import SlideFormat

if TYPE_CHECKING:
    from anndata import AnnData

MATRIX_STEM = "filtered_feature_bc_matrix"
MATRIX_H5 = f"{MATRIX_STEM}.h5"
# the files of a 10x MEX folder; Cell Ranger 2 wrote genes.tsv instead of features.tsv
MEX_FILES = ("barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz")
POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def find_outs(path: Path) -> Path | None:
    """Return the Space Ranger 'outs' folder for ``path``, or None if it is not one."""
    for candidate in (path, path / "outs"):
        if find_matrix(candidate) is not None:
            return candidate
    return None


def _mex_file(folder: Path, name: str) -> Path | None:
    """``name`` (e.g. 'matrix.mtx.gz') in a MEX folder, gzipped or not."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def is_mex_folder(folder: Path) -> bool:
    """A 10x MEX folder: matrix.mtx and barcodes.tsv (gzipped or not)."""
    return (
        folder.is_dir()
        and _mex_file(folder, "matrix.mtx.gz") is not None
        and _mex_file(folder, "barcodes.tsv.gz") is not None
    )


def find_matrix(folder: Path, stem: str = MATRIX_STEM) -> Path | None:
    """The 10x matrix ``<stem>.h5`` in ``folder`` (preferred: one file, fast to read), else
    the MEX folder ``<stem>/``; None if neither is there."""
    if not folder.is_dir():
        return None
    exact = folder / f"{stem}.h5"
    if exact.is_file():
        return exact
    # 10x public datasets prefix the sample name, e.g. V1_Heart_filtered_feature_bc_matrix.h5
    matches = sorted(folder.glob(f"*{stem}.h5"))
    if len(matches) == 1:
        return matches[0]
    mex = folder / stem
    return mex if is_mex_folder(mex) else None


def missing_matrix_message(folder: Path, stem: str = MATRIX_STEM) -> str:
    """What a Space Ranger folder without a matrix lacks, for error messages."""
    return (
        f"{str(folder)!r} has no count matrix: expected {stem}.h5 or the folder {stem}/ "
        f"with {', '.join(MEX_FILES)} (as Space Ranger writes them)"
    )


def read_10x_matrix(path: Path) -> AnnData:
    """Read a 10x matrix, ``.h5`` file or MEX folder, as spots x genes (float32 CSR)."""
    return _read_10x_mex(path) if path.is_dir() else _read_10x_h5(path)


def _decode(values: np.ndarray) -> list[str]:
    """Decode an HDF5 byte-string array to Python strings."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _open_10x_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise FileFormatError(
            f"Cannot open {str(path)!r} as a 10x HDF5 matrix ({err}); the file may be "
            "truncated (an interrupted download or copy): copy it again from the Space Ranger "
            "output, or use the MEX folder filtered_feature_bc_matrix/ instead."
        ) from err


def _h5_matrix_group(f, path: Path):
    """The group holding the matrix, and its features' names, ids and types (or None)."""
    import h5py

    if "matrix" in f:
        grp = f["matrix"]
        feats = grp["features"]
        names = _decode(feats["name"][:])
        ids = _decode(feats["id"][:])
        ftype = _decode(feats["feature_type"][:]) if "feature_type" in feats else None
        return grp, names, ids, ftype
    # Cell Ranger 2 layout: one group per genome with genes/gene_names.
    groups = [k for k in f if isinstance(f[k], h5py.Group)]
    if len(groups) != 1 or "gene_names" not in f[groups[0]]:
        raise FileFormatError(
            f"{str(path)!r} is not a 10x feature-barcode matrix: no 'matrix' group."
        )
    grp = f[groups[0]]
    return grp, _decode(grp["gene_names"][:]), _decode(grp["genes"][:]), None


def _incomplete(path: Path, err: KeyError) -> FileFormatError:
    return FileFormatError(
        f"{str(path)!r} is not a complete 10x feature-barcode matrix ({err}); copy it "
        "again from the Space Ranger output."
    )


def _read_10x_h5(path: Path) -> AnnData:
    """Read a 10x feature-barcode HDF5 matrix (CSC over barcodes) as spots x genes."""
    from scipy import sparse

    f = _open_10x_h5(path)
    try:
        with f:
            grp, names, ids, ftype = _h5_matrix_group(f, path)
            n_genes, n_barcodes = (int(v) for v in grp["shape"][:])
            genes_by_barcodes = sparse.csc_matrix(
                (grp["data"][:], grp["indices"][:], grp["indptr"][:]), shape=(n_genes, n_barcodes)
            )
            barcodes = _decode(grp["barcodes"][:])
            metadata = _h5_metadata(f)
    except KeyError as err:  # a dataset of the 10x layout is missing
        raise _incomplete(path, err) from err
    return _matrix_anndata(genes_by_barcodes, barcodes, names, ids, ftype, metadata)


def _h5_metadata(f) -> dict:
    return {
        key: (val.decode() if isinstance(val, bytes) else str(val))
        for key, val in f.attrs.items()
        if key in ("chemistry_description", "software_version")
    }


class TenxH5Columns:
    """A 10x ``.h5`` matrix read a set of barcodes at a time (``read(rows)``: those barcodes'
    counts, spots x genes, gene-expression features only): a tile of a large slide reads only
    its own bins, in the runs of consecutive barcodes they form. ``adata`` is the matrix's
    barcodes and genes without counts (X None), as :func:`read_10x_matrix` would name them.

    Pickles as its path (for dask workers): the file is opened again where it is read."""

    GAP = 16  # barcodes not wanted between two runs read in one slice rather than two

    def __init__(self, path: Path):
        import anndata as ad

        self.path = Path(path)
        f = _open_10x_h5(self.path)
        try:
            with f:
                grp, names, ids, ftype = _h5_matrix_group(f, self.path)
                self.shape = tuple(int(v) for v in grp["shape"][:])
                barcodes = _decode(grp["barcodes"][:])
                metadata = _h5_metadata(f)
        except KeyError as err:
            raise _incomplete(self.path, err) from err
        var, self.keep = _gene_features(names, ids, ftype)
        self.adata = ad.AnnData(obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
        self.adata.uns["_10x_metadata"] = metadata

    def __getstate__(self):
        return {"path": self.path, "shape": self.shape, "keep": self.keep}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.adata = None

    def read(self, rows):
        """Counts of the barcodes ``rows`` (positions in the matrix), in that order."""
        from scipy import sparse

        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        n_genes = self.shape[0]
        parts, starts = [], []
        f = _open_10x_h5(self.path)
        try:
            with f:
                grp, *_ = _h5_matrix_group(f, self.path)
                indptr_ds, data_ds, indices_ds = grp["indptr"], grp["data"], grp["indices"]
                breaks = np.flatnonzero(np.diff(wanted) > self.GAP) + 1
                for run in np.split(wanted, breaks) if wanted.size else []:
                    a, b = int(run[0]), int(run[-1]) + 1
                    indptr = indptr_ds[a : b + 1].astype(np.int64)
                    lo, hi = int(indptr[0]), int(indptr[-1])
                    block = sparse.csc_matrix(
                        (data_ds[lo:hi].astype(np.float32), indices_ds[lo:hi], indptr - lo),
                        shape=(n_genes, b - a),
                    )
                    parts.append(block[:, run - a])
                    starts.append(run)
        except KeyError as err:
            raise _incomplete(self.path, err) from err
        if not parts:
            matrix = sparse.csr_matrix((0, n_genes), dtype=np.float32)
        else:
            matrix = sparse.hstack(parts, format="csc").T.tocsr()
        matrix = matrix[np.argsort(order, kind="stable")]  # back to the order asked for
        if self.keep is not None:
            matrix = matrix[:, self.keep]
        return matrix.astype(np.float32)


def _read_10x_mex(folder: Path) -> AnnData:
    """Read a 10x MEX folder (matrix.mtx, features.tsv or genes.tsv, barcodes.tsv; each
    optionally gzipped) as spots x genes."""
    import scipy.io

    matrix = _mex_file(folder, "matrix.mtx.gz")
    barcodes_file = _mex_file(folder, "barcodes.tsv.gz")
    features_file = _mex_file(folder, "features.tsv.gz") or _mex_file(folder, "genes.tsv.gz")
    if matrix is None or barcodes_file is None or features_file is None:
        raise FileFormatError(missing_matrix_message(folder.parent, folder.name) + ".")
    try:
        genes_by_barcodes = scipy.io.mmread(matrix)
        barcodes = pd.read_csv(barcodes_file, sep="\t", header=None, dtype=str)[0].tolist()
        features = pd.read_csv(features_file, sep="\t", header=None, dtype=str)
    except (ValueError, OSError, EOFError, pd.errors.ParserError) as err:
        raise FileFormatError(
            f"Cannot read the 10x MEX folder {str(folder)!r}: {err}. Copy it again from the "
            "Space Ranger output, or use the matching .h5 matrix instead."
        ) from err
    ids = features[0].tolist()
    names = features[1].tolist() if features.shape[1] > 1 else ids
    ftype = features[2].tolist() if features.shape[1] > 2 else None
    if genes_by_barcodes.shape != (len(ids), len(barcodes)):
        raise FileFormatError(
            f"{str(matrix)!r} is {genes_by_barcodes.shape[0]} x {genes_by_barcodes.shape[1]} "
            f"but the folder lists {len(ids)} features and {len(barcodes)} barcodes: the files "
            "are not from the same matrix."
        )
    return _matrix_anndata(genes_by_barcodes, barcodes, names, ids, ftype, {})


def _gene_features(names, ids, ftype) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The matrix's ``var`` (gene-expression features only, names made unique) and the mask of
    the features kept (None: all)."""
    import anndata as ad

    var = pd.DataFrame({"gene_ids": ids}, index=pd.Index(names))
    keep = None
    if ftype is not None:
        var["feature_types"] = ftype
        expression = var["feature_types"].to_numpy() == "Gene Expression"
        if expression.any():  # antibody/CRISPR rows are not genes
            keep, var = expression, var.loc[expression]
    # Same result as AnnData.var_names_make_unique, without the constructor's warning.
    var.index = ad.utils.make_index_unique(var.index.astype(str))
    return var, keep


def _matrix_anndata(genes_by_barcodes, barcodes, names, ids, ftype, metadata) -> AnnData:
    """Spots x genes AnnData of a 10x genes x barcodes matrix, gene-expression features only."""
    import anndata as ad
    from scipy import sparse

    X = sparse.csr_matrix(genes_by_barcodes.T, dtype=np.float32)
    var, keep = _gene_features(names, ids, ftype)
    if keep is not None:
        X = X[:, keep]
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
    adata.uns["_10x_metadata"] = metadata
    return adata


def read_tissue_positions(spatial_dir: Path) -> pd.DataFrame:
    """Read Space Ranger spot positions, indexed by barcode."""
    csv_new = spatial_dir / "tissue_positions.csv"
    csv_old = spatial_dir / "tissue_positions_list.csv"
    parquet = spatial_dir / "tissue_positions.parquet"
    if csv_new.is_file() or csv_old.is_file():
        return read_positions_csv(csv_new if csv_new.is_file() else csv_old)
    if parquet.is_file():
        try:
            pos = pd.read_parquet(parquet)
        except ImportError as err:  # pyarrow is a dependency; a broken install lands here
            raise FileFormatError(
                f"Reading {str(parquet)!r} needs pyarrow (`pip install pyarrow`), "
                "a dependency of napari-stlnmf: reinstall napari-stlnmf."
            ) from err
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise FileFormatError(
                f"Cannot read {str(parquet)!r} as a parquet table ({err}); the file may be "
                "truncated: copy it again from the Space Ranger output."
            ) from err
        return _finish_positions(pos, parquet)
    raise CoordinateError(
        f"No spot positions in {str(spatial_dir)!r}: expected spatial/tissue_positions.csv "
        "(Space Ranger >= 2.0), spatial/tissue_positions_list.csv (older) or "
        "spatial/tissue_positions.parquet (Visium HD)."
    )


def read_positions_csv(path: Path) -> pd.DataFrame:
    """Read a Space Ranger ``tissue_positions[_list].csv``, indexed by barcode."""
    # Decide on the header from the first line itself: guessing with header=0 on a
    # header-less file silently turns the first spot into column names.
    with open(path) as fh:
        first = fh.readline().strip().split(",")
    has_header = "in_tissue" in first or "barcode" in first
    pos = pd.read_csv(path, header=0 if has_header else None)
    if not has_header:
        if pos.shape[1] != len(POSITION_COLUMNS):
            raise FileFormatError(
                f"{str(path)!r} has {pos.shape[1]} columns and no header; expected "
                f"{len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)}."
            )
        pos.columns = POSITION_COLUMNS
    return _finish_positions(pos, path)


def _finish_positions(pos: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in POSITION_COLUMNS if c not in pos.columns]
    if missing and "barcode" not in pos.columns and pos.index.name == "barcode":
        pos = pos.reset_index()
        missing = [c for c in POSITION_COLUMNS if c not in pos.columns]
    if missing:
        raise FileFormatError(
            f"{str(path)!r} lacks column(s) {examples(missing)}; expected "
            f"{', '.join(POSITION_COLUMNS)}."
        )
    pos = pos.set_index(pos["barcode"].astype(str)).drop(columns="barcode")
    if pos.index.has_duplicates:
        dups = pos.index[pos.index.duplicated()].unique()
        raise DuplicateNamesError(
            f"{str(path)!r} lists {len(dups)} barcode(s) more than once, e.g. {examples(dups)}."
        )
    return pos


def attach_positions(adata: AnnData, pos: pd.DataFrame, matrix: Path, where: Path) -> None:
    """Put the positions ``pos`` (indexed by barcode) of the matrix's barcodes into
    ``obs`` (in_tissue, array_row, array_col) and ``obsm['spatial']`` (x, y full-res px)."""
    pos = rows_in_order(  # matrix order, drops positions of spots not in the matrix
        pos,
        adata.obs_names,
        f"barcodes of {matrix.name} have no position in {str(where)!r}",
        "Are the matrix and the spatial/ folder from the same Space Ranger run?",
    )
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy()
    adata.obsm[SPATIAL_KEY] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
        dtype=np.float64
    )


def read_scalefactors(spatial_dir: Path) -> dict[str, Any]:
    """``spatial/scalefactors_json.json`` as a dict ({} when absent)."""
    path = spatial_dir / "scalefactors_json.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{str(path)!r} is not valid JSON: {err}.") from err


def read_tissue_images(*spatial_dirs: Path) -> dict[str, np.ndarray]:
    """The hires and lowres tissue images, each from the first of ``spatial_dirs`` holding it."""
    images = {}
    for key in ("hires", "lowres"):
        for spatial_dir in spatial_dirs:
            img_path = spatial_dir / f"tissue_{key}_image.png"
            if img_path.is_file():
                images[key] = read_image(img_path)
                break
    return images


def detect(path: Path) -> bool:
    """A folder with the filtered matrix, in it or in its ``outs/``."""
    return find_outs(path) is not None


def read(path: Path, *, library_id: str | None = None, **_other_options: Any) -> AnnData:
    """Read a Space Ranger ``outs/`` folder (or the folder containing it)."""
    outs = find_outs(path)
    matrix = None if outs is None else find_matrix(outs)
    if outs is None or matrix is None:
        raise FileFormatError(
            missing_matrix_message(path) + ", in it or in outs/. For Visium HD output, open "
            "the outs/ folder, binned_outputs/ or one square_XXXum/ folder."
        )
    adata = read_10x_matrix(matrix)
    metadata = adata.uns.pop("_10x_metadata")
    spatial_dir = outs / "spatial"
    attach_positions(adata, read_tissue_positions(spatial_dir), matrix, spatial_dir)
    if library_id is None:
        library_id = outs.parent.name if outs.name == "outs" else outs.name
    images, scalefactors = read_tissue_images(spatial_dir), read_scalefactors(spatial_dir)
    images = _placeable_images(images, scalefactors, spatial_dir)
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }
    return adata


def _placeable_images(images: dict, scalefactors: dict, spatial_dir: Path) -> dict:
    """The images that can be placed on the spots: each needs its ``tissue_<key>_scalef`` from
    ``scalefactors_json.json``; the others are left out with a warning naming the file (kept,
    they would fail every later step that draws or reads the image)."""
    placeable = {k: v for k, v in images.items() if f"tissue_{k}_scalef" in scalefactors}
    dropped = sorted(set(images) - set(placeable))
    if dropped:
        path = spatial_dir / "scalefactors_json.json"
        why = (
            "is missing"
            if not path.is_file()
            else "has no " + ", ".join(f"tissue_{k}_scalef" for k in dropped)
        )
        warnings.warn(
            f"{str(path)!r} {why}, so the {', '.join(dropped)} tissue image(s) cannot be placed "
            "on the spots and are not used (no image features, maps without the image). "
            "Copy scalefactors_json.json from Space Ranger's outs/spatial/ to use them.",
            UserWarning,
            stacklevel=4,
        )
    return placeable


FORMAT = SlideFormat(
    name="spaceranger",
    detect=detect,
    read=read,
    description=(
        "a 10x Space Ranger 'outs' folder (or the folder containing it) with "
        f"{MATRIX_H5} (or the MEX folder {MATRIX_STEM}/) and spatial/tissue_positions[_list].csv"
    ),
    options=frozenset(),
)
