"""napari_stlnmf.io.h5ad: .h5ad slides, coords= replacing obsm['spatial']."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from io_testdata import BARCODES, make_outs

from napari_stlnmf import io
from napari_stlnmf.errors import CoordinateError


def test_h5ad_round_trip(tmp_path):
    adata = io.read_slide(make_outs(tmp_path, header=True))
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
