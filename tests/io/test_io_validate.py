"""napari_stlnmf.io.validate: slides, single-cell references and signatures."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from io_testdata import assert_same, small_reference, small_signature, small_slide
from scipy import sparse

from napari_stlnmf import io
from napari_stlnmf.errors import (
    CellTypeKeyError,
    CoordinateError,
    DuplicateNamesError,
    EmptyCellTypeError,
    InvalidCountsError,
)

# anndata warns when a test corrupts names on purpose
ignore_duplicate_warning = pytest.mark.filterwarnings("ignore:.*names are not unique")


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
    adata = small_slide(dense)
    io.validate_slide(adata)  # valid before corruption
    corrupt(adata)
    before = adata.copy()
    with pytest.raises(error, match=message):
        io.validate_slide(adata)
    assert_same(adata, before)


def test_validate_slide_integer_counts_and_sparse_untouched():
    adata = small_slide(dense=False)
    adata.X = adata.X.astype(np.int64)
    before = adata.copy()
    io.validate_slide(adata)
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.int64
    assert_same(adata, before)


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
    ref = small_reference()
    io.validate_reference(ref, cell_type_key="cell_type")
    corrupt(ref)
    before = ref.copy()
    with pytest.raises(error, match=message):
        io.validate_reference(ref, cell_type_key="cell_type", **kwargs)
    assert_same(ref, before)


@pytest.mark.parametrize("key", [None, "celltype"])
def test_validate_reference_key_errors(key):
    ref = small_reference()
    with pytest.raises(CellTypeKeyError, match=r"'cell_type', 'batch'.*'n_counts'"):
        io.validate_reference(ref, cell_type_key=key)


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
    sig = small_signature()
    io.validate_reference(sig)
    corrupt(sig)
    before = sig.copy()
    with pytest.raises(error, match=message):
        io.validate_reference(sig)
    pd.testing.assert_frame_equal(sig, before)


# --------------------------------------------------------------------------- #
# build_reference runs the same checks
# --------------------------------------------------------------------------- #


@ignore_duplicate_warning
@pytest.mark.parametrize(
    ("corrupt", "kwargs", "error", "message"),
    REFERENCE_ERRORS[1:],  # build_reference ignores unused categories: it keeps observed types
    ids=["min_cells", "dup_genes", "nan", "negative", "single_type"],
)
def test_build_reference_raises_what_validate_reference_raises(corrupt, kwargs, error, message):
    from napari_stlnmf.preprocess import build_reference

    ref = small_reference()
    corrupt(ref)
    messages = []
    for check in (io.validate_reference, build_reference):
        with pytest.raises(error, match=message) as raised:
            check(ref, cell_type_key="cell_type", **kwargs)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]  # word for word


@pytest.mark.parametrize("key", [None, "celltype"])
def test_build_reference_key_errors(key):
    from napari_stlnmf.preprocess import build_reference

    with pytest.raises(CellTypeKeyError, match=r"'cell_type', 'batch'.*'n_counts'"):
        build_reference(small_reference(), cell_type_key=key)


@pytest.mark.parametrize(
    ("corrupt", "error", "message"), SIGNATURE_ERRORS, ids=["nan", "negative", "zero", "dup"]
)
def test_build_reference_signature_errors(corrupt, error, message):
    from napari_stlnmf.preprocess import build_reference

    sig = small_signature()
    corrupt(sig)
    with pytest.raises(error, match=message):
        build_reference(sig)


def test_reference_counts_layer_is_what_gets_checked():
    from napari_stlnmf.preprocess import build_reference

    ref = small_reference()
    ref.layers["counts"] = ref.X.copy()
    ref.X = ref.X * -1.0  # e.g. scaled data in X; the raw counts are in the layer
    io.validate_reference(ref, cell_type_key="cell_type")
    build_reference(ref, cell_type_key="cell_type")
    ref.layers["counts"] = ref.X.copy()
    with pytest.raises(InvalidCountsError, match="negative"):
        io.validate_reference(ref, cell_type_key="cell_type")
