"""napari_stlnmf.io.reference: reading references and listing cell-type columns."""

from __future__ import annotations

import anndata as ad
import pandas as pd
import pytest
from io_testdata import small_reference, small_signature

from napari_stlnmf import io
from napari_stlnmf.errors import CellTypeKeyError, FileFormatError


def test_read_reference_and_columns(tmp_path):
    ref = small_reference()
    path = tmp_path / "ref.h5ad"
    ref.write_h5ad(path)
    # likely cell-type names first; numeric and single-valued columns left out
    assert io.reference_columns(path) == ["cell_type", "batch"]
    back = io.read_reference(path, cell_type_key="cell_type")
    assert isinstance(back, ad.AnnData) and back.shape == ref.shape
    with pytest.raises(CellTypeKeyError, match=r"'celltype'.*'cell_type'"):
        io.read_reference(path, cell_type_key="celltype")
    sig_path = tmp_path / "signature.tsv"
    small_signature().to_csv(sig_path, sep="\t")
    pd.testing.assert_frame_equal(io.read_reference(sig_path), small_signature())
    loom = tmp_path / "ref.loom"
    loom.write_text("")
    with pytest.raises(FileFormatError, match="h5ad"):
        io.read_reference(loom)
    with pytest.raises(FileFormatError, match="h5ad"):
        io.reference_columns(loom)
