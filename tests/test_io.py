"""Tests of napari_stlnmf.io: readers, validation and image checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import shared_dir
from PIL import Image
from scipy import sparse

from napari_stlnmf import io
from napari_stlnmf.errors import (
    CellTypeKeyError,
    CoordinateError,
    DuplicateNamesError,
    EmptyCellTypeError,
    FileFormatError,
    ImageMismatchError,
    InvalidCountsError,
    StlnmfError,
)

# anndata warns when a test corrupts names on purpose
ignore_duplicate_warning = pytest.mark.filterwarnings("ignore:.*names are not unique")


def _data_dir(name: str) -> Path:
    return shared_dir(name)


# --------------------------------------------------------------------------- #
# fake Space Ranger output
# --------------------------------------------------------------------------- #

BARCODES = ["AAACAAGT-1", "CCCGGGTT-1", "GGGTTTAA-1"]
# genes x barcodes; the last feature is an antibody and must be dropped
COUNTS = np.array(
    [
        [1, 0, 3],
        [0, 2, 0],
        [5, 0, 0],
        [9, 9, 9],
    ],
    dtype=np.int32,
)
FEATURE_NAMES = ["Gene1", "Gene1", "Gene2", "CD3"]
FEATURE_IDS = ["ENSG1", "ENSG2", "ENSG3", "AB1"]
FEATURE_TYPES = ["Gene Expression"] * 3 + ["Antibody Capture"]
# barcode -> (in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres)
POSITIONS = {
    "AAACAAGT-1": (1, 0, 0, 100, 200),  # first line of the file: must not be lost
    "TTTTTTTT-1": (0, 0, 2, 110, 220),  # not in the matrix
    "GGGTTTAA-1": (1, 1, 1, 300, 400),
    "CCCGGGTT-1": (1, 2, 0, 350, 150),
}
LOWRES_SHAPE = (40, 50)  # (height, width)
LOWRES_SCALEF = 0.1


def _write_10x_h5(path: Path) -> None:
    csc = sparse.csc_matrix(COUNTS)  # CSC over barcodes, as Space Ranger stores it
    with h5py.File(path, "w") as f:
        f.attrs["software_version"] = np.bytes_("spaceranger-2.1.0")
        grp = f.create_group("matrix")
        grp["data"] = csc.data
        grp["indices"] = csc.indices.astype(np.int64)
        grp["indptr"] = csc.indptr.astype(np.int64)
        grp["shape"] = np.array(COUNTS.shape, dtype=np.int32)
        grp["barcodes"] = np.array(BARCODES, dtype="S")
        feats = grp.create_group("features")
        feats["name"] = np.array(FEATURE_NAMES, dtype="S")
        feats["id"] = np.array(FEATURE_IDS, dtype="S")
        feats["feature_type"] = np.array(FEATURE_TYPES, dtype="S")


def _make_outs(root: Path, *, header: bool) -> Path:
    outs = root / "sample1" / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True)
    _write_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    lines = [",".join([bc, *map(str, vals)]) for bc, vals in POSITIONS.items()]
    if header:
        header_line = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"
        (spatial / "tissue_positions.csv").write_text("\n".join([header_line, *lines]) + "\n")
    else:
        (spatial / "tissue_positions_list.csv").write_text("\n".join(lines) + "\n")
    scalefactors = {
        "tissue_lowres_scalef": LOWRES_SCALEF,
        "tissue_hires_scalef": 0.5,
        "spot_diameter_fullres": 30.0,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(*LOWRES_SHAPE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(spatial / "tissue_lowres_image.png")
    return outs


@pytest.mark.parametrize("header", [True, False], ids=["positions_csv", "positions_list_csv"])
def test_read_visium_outs(tmp_path, header):
    outs = _make_outs(tmp_path, header=header)
    adata = io.read_slide(outs)

    # all matrix barcodes, in matrix order, first one included
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == ["Gene1", "Gene1-1", "Gene2"]
    assert list(adata.var["gene_ids"]) == ["ENSG1", "ENSG2", "ENSG3"]
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS[:3].T)

    expected_xy = [[POSITIONS[bc][4], POSITIONS[bc][3]] for bc in BARCODES]  # (col, row)
    np.testing.assert_array_equal(adata.obsm["spatial"], expected_xy)
    assert list(adata.obs["array_row"]) == [POSITIONS[bc][1] for bc in BARCODES]
    assert list(adata.obs["in_tissue"]) == [1, 1, 1]

    library_id, lib = io.get_library(adata)
    assert library_id == "sample1"
    assert set(lib["images"]) == {"lowres"}
    img = lib["images"]["lowres"]
    assert img.dtype == np.uint8 and img.shape == (*LOWRES_SHAPE, 3)
    assert lib["scalefactors"]["tissue_lowres_scalef"] == LOWRES_SCALEF
    assert lib["metadata"]["software_version"] == "spaceranger-2.1.0"

    image, scalef, diameter = io.get_image(adata)  # falls back to lowres
    assert image.shape == (*LOWRES_SHAPE, 3)
    assert scalef == LOWRES_SCALEF and diameter == 30.0
    io.validate_slide(adata)
    io.check_image_covers_spots(adata)


def test_read_visium_sample_folder_and_missing_positions(tmp_path):
    outs = _make_outs(tmp_path, header=True)
    adata = io.read_slide(outs.parent)  # the folder containing outs/
    assert list(adata.obs_names) == BARCODES
    assert io.read_slide(outs, library_id="custom").uns["spatial"].keys() == {"custom"}

    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(CoordinateError, match="tissue_positions"):
        io.read_slide(outs)


def test_read_visium_barcode_without_position(tmp_path):
    outs = _make_outs(tmp_path, header=False)
    pos_file = outs / "spatial" / "tissue_positions_list.csv"
    lines = pos_file.read_text().splitlines()
    pos_file.write_text("\n".join(line for line in lines if "GGGTTTAA" not in line) + "\n")
    with pytest.raises(CoordinateError, match="GGGTTTAA-1"):
        io.read_slide(outs)


def test_h5ad_round_trip(tmp_path):
    adata = io.read_slide(_make_outs(tmp_path, header=True))
    path = tmp_path / "slide.h5ad"
    adata.write_h5ad(path)
    back = io.read_slide(path)
    assert list(back.obs_names) == BARCODES
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    np.testing.assert_array_equal(
        io.get_image(back)[0], adata.uns["spatial"]["sample1"]["images"]["lowres"]
    )


def test_h5ad_without_spatial(tmp_path):
    path = tmp_path / "nospatial.h5ad"
    adata = ad.AnnData(X=np.ones((3, 2), dtype=np.float32), obs=pd.DataFrame(index=["a", "b", "c"]))
    adata.obsm["X_umap"] = np.zeros((3, 2))
    adata.write_h5ad(path)
    with pytest.raises(CoordinateError, match=r"obsm\['spatial'\].*x, y.*X_umap"):
        io.read_slide(path)
    coords = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [4.0, 5.0, 6.0]}, index=["c", "a", "b"])
    fixed = io.read_slide(path, coords=coords)
    np.testing.assert_array_equal(fixed.obsm["spatial"], [[2, 5], [3, 6], [1, 4]])


def test_unsupported_inputs(tmp_path):
    other = tmp_path / "slide.xlsx"
    other.write_text("x")
    with pytest.raises(FileFormatError, match=r"\.h5ad"):
        io.read_slide(other)
    with pytest.raises(FileFormatError, match=r"filtered_feature_bc_matrix\.h5"):
        io.read_slide(tmp_path)  # a folder without Space Ranger output
    with pytest.raises(FileNotFoundError):
        io.read_slide(tmp_path / "missing.h5ad")


# --------------------------------------------------------------------------- #
# counts tables
# --------------------------------------------------------------------------- #


def test_read_csv_visium_demo_with_image():
    folder = _data_dir("visium_demo_scanpy")
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
    adata = io.read_slide(
        folder / "counts.csv.gz",
        coords=folder / "coords.csv",
        image=folder / "tissue_lowres_image.png",
        scalefactor=0.045004502,
        spot_diameter=89.43,
    )
    assert adata.shape == (100, 100)
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts.to_numpy())
    np.testing.assert_array_equal(adata.obsm["spatial"], coords[["x", "y"]].to_numpy())
    assert list(adata.obs["array_row"]) == list(coords["array_row"])

    image, scalef, diameter = io.get_image(adata)
    assert image.shape == (600, 600, 3) and image.dtype == np.uint8
    assert scalef == pytest.approx(0.045004502)
    assert diameter == pytest.approx(89.43)
    assert io.get_library(adata)[0] == "counts"
    io.validate_slide(adata)
    io.check_image_covers_spots(adata)

    wrong = io.read_slide(
        folder / "counts.csv.gz",
        coords=folder / "coords.csv",
        image=folder / "tissue_lowres_image.png",
        scalefactor=1.0,
    )
    with pytest.raises(ImageMismatchError, match=r"600 x 600.*scale factor") as err:
        io.check_image_covers_spots(wrong)
    assert "0.05" in str(err.value)  # suggests a scale factor of the right magnitude


def test_read_csv_with_10x_positions_as_coords():
    folder = _data_dir("visium_demo_scanpy")
    adata = io.read_slide(folder / "counts.csv.gz", coords=folder / "tissue_positions_all.csv")
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    np.testing.assert_array_equal(adata.obsm["spatial"], coords[["x", "y"]].to_numpy())
    assert {"in_tissue", "array_row", "array_col"} <= set(adata.obs.columns)


def test_read_csv_mob():
    folder = _data_dir("mob_rep12")
    adata = io.read_slide(folder / "counts.csv.gz", coords=folder / "coords.csv")
    assert adata.shape == (282, 4284)
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    np.testing.assert_allclose(adata.obsm["spatial"], coords[["x", "y"]].to_numpy())
    assert float(adata.X.sum()) > 0
    # ST array units with ~1 unit pitch: estimated diameter ~0.55
    _, lib = io.get_library(adata)
    assert lib["images"] == {}
    assert 0.3 < lib["scalefactors"]["spot_diameter_fullres"] < 0.8
    assert io.get_image(adata) is None
    io.validate_slide(adata)

    signature = io.read_reference(folder / "reference_signature.csv")
    assert isinstance(signature, pd.DataFrame)
    assert signature.shape == (4284, 5)
    assert all(dt == np.float64 for dt in signature.dtypes)
    io.validate_reference(signature)
    assert io.reference_columns(folder / "reference_signature.csv") == []


def _write_small_table(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = pd.DataFrame(
        [[1, 0, 2], [0, 3, 1], [4, 0, 0], [1, 1, 1]],
        index=["s1", "s2", "s3", "s4"],
        columns=["g1", "g2", "g3"],
    )
    coords = pd.DataFrame(
        {"imagecol": [0.0, 1.0, 0.0, 1.0], "imagerow": [0.0, 0.0, 1.0, 1.0]},
        index=["s4", "s3", "s2", "s1"],  # another order than the counts
    )
    coords.to_csv(tmp_path / "coords.csv")
    return counts, coords


def test_read_tsv_aligns_coords_and_array_coords(tmp_path):
    counts, coords = _write_small_table(tmp_path)
    counts.to_csv(tmp_path / "slide.tsv", sep="\t")
    adata = io.read_slide(tmp_path / "slide.tsv", coords=tmp_path / "coords.csv")
    assert list(adata.obs_names) == list(counts.index)
    np.testing.assert_array_equal(adata.X.toarray(), counts.to_numpy())
    np.testing.assert_array_equal(
        adata.obsm["spatial"], coords.loc[counts.index, ["imagecol", "imagerow"]].to_numpy()
    )
    assert io.get_library(adata)[0] == "slide"
    # pitch 1 -> diameter 0.55
    assert io.get_library(adata)[1]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(0.55)

    xy = np.arange(8, dtype=float).reshape(4, 2)
    from_array = io.read_slide(tmp_path / "slide.tsv", coords=xy)
    np.testing.assert_array_equal(from_array.obsm["spatial"], xy)


def test_read_transposed_table_warns(tmp_path):
    counts, _ = _write_small_table(tmp_path)
    counts.T.to_csv(tmp_path / "genes_x_spots.csv.gz")
    with pytest.warns(UserWarning, match="transposed"):
        adata = io.read_slide(tmp_path / "genes_x_spots.csv.gz", coords=tmp_path / "coords.csv")
    assert list(adata.obs_names) == list(counts.index)
    assert list(adata.var_names) == list(counts.columns)
    np.testing.assert_array_equal(adata.X.toarray(), counts.to_numpy())


def test_read_table_errors(tmp_path):
    counts, _ = _write_small_table(tmp_path)
    counts.to_csv(tmp_path / "slide.csv")
    with pytest.raises(CoordinateError, match="coords="):
        io.read_slide(tmp_path / "slide.csv")
    pd.DataFrame({"x": [0.0, 1.0], "y": [0.0, 1.0]}, index=["s1", "s2"]).to_csv(
        tmp_path / "partial.csv"
    )
    with pytest.raises(CoordinateError, match=r"2 of 4 spots.*'s3'"):
        io.read_slide(tmp_path / "slide.csv", coords=tmp_path / "partial.csv")
    pd.DataFrame({"a": [0.0], "b": [0.0], "c": [1.0]}, index=["s1"]).to_csv(tmp_path / "bad.csv")
    with pytest.raises(CoordinateError, match="x/y"):
        io.read_slide(tmp_path / "slide.csv", coords=tmp_path / "bad.csv")
    counts.assign(symbol="x").to_csv(tmp_path / "annotated.csv")
    with pytest.raises(FileFormatError, match=r"non-numeric.*'symbol'"):
        io.read_slide(tmp_path / "annotated.csv", coords=tmp_path / "coords.csv")


# --------------------------------------------------------------------------- #
# validate_slide
# --------------------------------------------------------------------------- #


def _slide(dense: bool) -> ad.AnnData:
    X = np.array([[1, 0, 2], [0, 3, 0], [4, 0, 1], [0, 0, 5]], dtype=np.float32)
    adata = ad.AnnData(
        X=X if dense else sparse.csr_matrix(X),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(4)]),
        var=pd.DataFrame(index=["g1", "g2", "g3"]),
    )
    adata.obsm["spatial"] = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    return adata


def _set_value(adata: ad.AnnData, row: int, col: int, value: float) -> None:
    if sparse.issparse(adata.X):
        X = adata.X.tolil()
        X[row, col] = value
        adata.X = X.tocsr()
    else:
        adata.X[row, col] = value


def _dup_obs(a):
    a.obs_names = ["spot0", "spot0", "spot2", "spot3"]


def _dup_var(a):
    a.var_names = ["g1", "g2", "g1"]


def _nan(a):
    _set_value(a, 1, 2, np.nan)


def _inf(a):
    _set_value(a, 2, 1, np.inf)


def _negative(a):
    _set_value(a, 3, 0, -2.0)


def _zeros(a):
    a.X = a.X * 0


def _no_coords(a):
    del a.obsm["spatial"]


def _one_column(a):
    a.obsm["spatial"] = np.zeros((a.n_obs, 1))


def _nan_coords(a):
    a.obsm["spatial"][2, 1] = np.nan


SLIDE_ERRORS = [
    (_dup_obs, DuplicateNamesError, r"spot barcode.*'spot0'.*obs_names_make_unique"),
    (_dup_var, DuplicateNamesError, r"gene name.*'g1'.*var_names_make_unique"),
    (_nan, InvalidCountsError, r"1 NaN or infinite.*'spot1'.*'g3'"),
    (_inf, InvalidCountsError, r"1 NaN or infinite.*'spot2'.*'g2'"),
    (_negative, InvalidCountsError, r"1 negative.*'spot3'.*'g1'"),
    (_zeros, InvalidCountsError, r"zero counts"),
    (_no_coords, CoordinateError, r"obsm\['spatial'\] is missing"),
    (_one_column, CoordinateError, r"shape \(4, 1\).*\(4, 2\)"),
    (_nan_coords, CoordinateError, r"1 of 4 spots.*'spot2'"),
]


@ignore_duplicate_warning
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
@pytest.mark.parametrize(
    ("corrupt", "error", "message"), SLIDE_ERRORS, ids=[c.__name__ for c, _, _ in SLIDE_ERRORS]
)
def test_validate_slide_errors(dense, corrupt, error, message):
    adata = _slide(dense)
    io.validate_slide(adata)  # valid before corruption
    corrupt(adata)
    before = adata.copy()
    with pytest.raises(error, match=message):
        io.validate_slide(adata)
    _assert_same(adata, before)


def _assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    Xa = a.X.toarray() if sparse.issparse(a.X) else a.X
    Xb = b.X.toarray() if sparse.issparse(b.X) else b.X
    np.testing.assert_array_equal(Xa, Xb)
    assert type(a.X) is type(b.X)
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    assert a.obs.equals(b.obs)
    assert set(a.obsm) == set(b.obsm)
    for key in a.obsm:
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])


def test_validate_slide_integer_counts_and_sparse_untouched():
    adata = _slide(dense=False)
    adata.X = adata.X.astype(np.int64)
    before = adata.copy()
    io.validate_slide(adata)
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.int64
    _assert_same(adata, before)


# --------------------------------------------------------------------------- #
# references
# --------------------------------------------------------------------------- #


def _reference() -> ad.AnnData:
    rng = np.random.default_rng(1)
    labels = pd.Categorical(["A", "A", "B", "B", "B", "C"], categories=["A", "B", "C"])
    return ad.AnnData(
        X=sparse.csr_matrix(rng.poisson(2.0, size=(6, 4)).astype(np.float32)),
        obs=pd.DataFrame(
            {
                "batch": ["b1", "b2", "b1", "b2", "b1", "b2"],
                "cell_type": labels,
                "n_counts": rng.random(6),
                "tissue": ["brain"] * 6,
            },
            index=[f"cell{i}" for i in range(6)],
        ),
        var=pd.DataFrame(index=["g1", "g2", "g3", "g4"]),
    )


def _unused_category(r):
    r.obs["cell_type"] = r.obs["cell_type"].cat.add_categories("D")


def _ref_dup_var(r):
    r.var_names = ["g1", "g2", "g2", "g4"]


def _ref_nan(r):
    X = r.X.tolil()
    X[0, 1] = np.nan
    r.X = X.tocsr()


def _ref_negative(r):
    X = r.X.toarray()
    X[5, 3] = -1
    r.X = sparse.csr_matrix(X)


def _ref_single_type(r):
    r.obs["cell_type"] = pd.Categorical(["A"] * 6)


REFERENCE_ERRORS = [
    (_unused_category, {}, EmptyCellTypeError, r"'D' \(0\).*remove_unused_categories"),
    (lambda r: None, {"min_cells": 2}, EmptyCellTypeError, r"fewer than 2.*'C' \(1\)"),
    (_ref_dup_var, {}, DuplicateNamesError, r"'g2'"),
    (_ref_nan, {}, InvalidCountsError, r"NaN.*'cell0'.*'g2'"),
    (_ref_negative, {}, InvalidCountsError, r"negative.*'cell5'.*'g4'"),
    (_ref_single_type, {}, CellTypeKeyError, r"1 cell type"),
]


@ignore_duplicate_warning
@pytest.mark.parametrize(
    ("corrupt", "kwargs", "error", "message"),
    REFERENCE_ERRORS,
    ids=["unused_category", "min_cells", "dup_genes", "nan", "negative", "single_type"],
)
def test_validate_reference_anndata_errors(corrupt, kwargs, error, message):
    ref = _reference()
    io.validate_reference(ref, cell_type_key="cell_type")
    corrupt(ref)
    before = ref.copy()
    with pytest.raises(error, match=message):
        io.validate_reference(ref, cell_type_key="cell_type", **kwargs)
    _assert_same(ref, before)


@pytest.mark.parametrize("key", [None, "celltype"])
def test_validate_reference_key_errors(key):
    ref = _reference()
    with pytest.raises(CellTypeKeyError, match=r"'cell_type', 'batch'.*'n_counts'"):
        io.validate_reference(ref, cell_type_key=key)


def _signature() -> pd.DataFrame:
    return pd.DataFrame({"T": [1.0, 0.5, 0.0], "B": [0.0, 2.0, 1.0]}, index=["g1", "g2", "g3"])


SIGNATURE_ERRORS = [
    (lambda s: s.iloc.__setitem__((1, 0), np.nan), InvalidCountsError, r"NaN.*'g2'.*'T'"),
    (lambda s: s.iloc.__setitem__((2, 1), -1.0), InvalidCountsError, r"negative.*'g3'.*'B'"),
    (lambda s: s.__setitem__("B", 0.0), EmptyCellTypeError, r"'B'"),
    (lambda s: setattr(s, "index", ["g1", "g1", "g3"]), DuplicateNamesError, r"'g1'"),
]


@pytest.mark.parametrize(
    ("corrupt", "error", "message"), SIGNATURE_ERRORS, ids=["nan", "negative", "zero", "dup"]
)
def test_validate_signature_errors(corrupt, error, message):
    sig = _signature()
    io.validate_reference(sig)
    corrupt(sig)
    before = sig.copy()
    with pytest.raises(error, match=message):
        io.validate_reference(sig)
    pd.testing.assert_frame_equal(sig, before)


def test_read_reference_and_columns(tmp_path):
    ref = _reference()
    path = tmp_path / "ref.h5ad"
    ref.write_h5ad(path)
    # likely cell-type names first; numeric and single-valued columns left out
    assert io.reference_columns(path) == ["cell_type", "batch"]
    back = io.read_reference(path, cell_type_key="cell_type")
    assert isinstance(back, ad.AnnData) and back.shape == ref.shape
    with pytest.raises(CellTypeKeyError, match=r"'celltype'.*'cell_type'"):
        io.read_reference(path, cell_type_key="celltype")
    sig_path = tmp_path / "signature.tsv"
    _signature().to_csv(sig_path, sep="\t")
    pd.testing.assert_frame_equal(io.read_reference(sig_path), _signature())
    loom = tmp_path / "ref.loom"
    loom.write_text("")
    with pytest.raises(FileFormatError, match="h5ad"):
        io.read_reference(loom)
    with pytest.raises(FileFormatError, match="h5ad"):
        io.reference_columns(loom)


# --------------------------------------------------------------------------- #
# libraries and images
# --------------------------------------------------------------------------- #


def test_libraries_and_image_checks():
    adata = _slide(dense=True)
    assert io.get_image(adata) is None
    io.check_image_covers_spots(adata)  # nothing to check without an image
    with pytest.raises(StlnmfError, match="uns\\['spatial'\\]"):
        io.get_library(adata)

    image = np.zeros((10, 20, 3), dtype=np.uint8)
    adata.obsm["spatial"] = np.array([[0, 0], [100, 0], [0, 50], [190, 95]], dtype=float)
    lib = {"images": {"hires": image}, "scalefactors": {"tissue_hires_scalef": 0.1}}
    adata.uns["spatial"] = {"one": lib, "two": copy.deepcopy(lib)}
    with pytest.raises(StlnmfError, match="'one', 'two'"):
        io.get_library(adata)
    with pytest.raises(StlnmfError, match="'one', 'two'"):
        io.check_image_covers_spots(adata)
    with pytest.raises(StlnmfError, match="'three'"):
        io.get_library(adata, "three")
    assert io.get_library(adata, "two")[0] == "two"
    io.check_image_covers_spots(adata, library_id="one")

    adata.uns["spatial"]["two"]["scalefactors"]["tissue_hires_scalef"] = 0.2
    with pytest.raises(ImageMismatchError, match=r"scale factor 0\.2.*20 x 10 px"):
        io.check_image_covers_spots(adata, library_id="two", image_key="hires")
    with pytest.raises(ImageMismatchError, match="'lowres'"):
        io.check_image_covers_spots(adata, library_id="one", image_key="lowres")
    assert io.get_image(adata, "one", prefer=("lowres",)) is None
    img, scalef, diameter = io.get_image(adata, "one")
    assert img.shape == (10, 20, 3) and scalef == 0.1 and diameter is None
