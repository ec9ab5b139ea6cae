"""10x Space Ranger (Visium) output: an ``outs/`` folder, or the sample folder holding it.

Reads ``filtered_feature_bc_matrix.h5`` (gene-expression features only), the spot
positions in ``spatial/tissue_positions[_list].csv`` (or ``.parquet``), the scale factors
and the hires/lowres tissue images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY
from ..errors import CoordinateError, DuplicateNamesError, FileFormatError
from ._util import examples
from .images import read_image
from .registry import SlideFormat

if TYPE_CHECKING:
    from anndata import AnnData

MATRIX_H5 = "filtered_feature_bc_matrix.h5"
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
        if _find_matrix_h5(candidate) is not None:
            return candidate
    return None


def _find_matrix_h5(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    exact = folder / MATRIX_H5
    if exact.is_file():
        return exact
    # 10x public datasets prefix the sample name, e.g. V1_Heart_filtered_feature_bc_matrix.h5
    matches = sorted(folder.glob(f"*{MATRIX_H5}"))
    return matches[0] if len(matches) == 1 else None


def _decode(values: np.ndarray) -> list[str]:
    """Decode an HDF5 byte-string array to Python strings."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _read_10x_h5(path: Path) -> AnnData:
    """Read a 10x feature-barcode HDF5 matrix (CSC over barcodes) as spots x genes."""
    import anndata as ad
    import h5py
    from scipy import sparse

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
        return read_positions_csv(csv_new if csv_new.is_file() else csv_old)
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


def detect(path: Path) -> bool:
    """A folder with the filtered matrix, in it or in its ``outs/``."""
    return find_outs(path) is not None


def read(path: Path, *, library_id: str | None = None, **_other_options: Any) -> AnnData:
    """Read a Space Ranger ``outs/`` folder (or the folder containing it)."""
    outs = find_outs(path)
    h5 = None if outs is None else _find_matrix_h5(outs)
    if outs is None or h5 is None:
        raise FileFormatError(f"{str(path)!r} has no {MATRIX_H5} in it or in outs/.")
    adata = _read_10x_h5(h5)
    metadata = adata.uns.pop("_10x_metadata")
    spatial_dir = outs / "spatial"
    pos = _read_tissue_positions(spatial_dir)

    barcodes = adata.obs_names
    missing = barcodes[~barcodes.isin(pos.index)]
    if len(missing):
        raise CoordinateError(
            f"{len(missing)} of {adata.n_obs} barcodes of {h5.name} have no position in "
            f"{str(spatial_dir)!r}, e.g. {examples(missing)}. Are the matrix and the "
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
            images[key] = read_image(img_path)
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }
    return adata


FORMAT = SlideFormat(
    name="spaceranger",
    detect=detect,
    read=read,
    description=(
        "a 10x Space Ranger 'outs' folder (or the folder containing it) with "
        f"{MATRIX_H5} and spatial/tissue_positions[_list].csv"
    ),
)
