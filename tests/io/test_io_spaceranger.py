"""napari_stlnmf.io.spaceranger: 10x Space Ranger outs/ folders."""

from __future__ import annotations

import numpy as np
import pytest
from io_testdata import BARCODES, COUNTS, LOWRES_SCALEF, LOWRES_SHAPE, POSITIONS, make_outs
from scipy import sparse

from napari_stlnmf import io
from napari_stlnmf.errors import CoordinateError


@pytest.mark.parametrize("header", [True, False], ids=["positions_csv", "positions_list_csv"])
def test_read_visium_outs(tmp_path, header):
    outs = make_outs(tmp_path, header=header)
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
    outs = make_outs(tmp_path, header=True)
    adata = io.read_slide(outs.parent)  # the folder containing outs/
    assert list(adata.obs_names) == BARCODES
    assert io.read_slide(outs, library_id="custom").uns["spatial"].keys() == {"custom"}

    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(CoordinateError, match="tissue_positions"):
        io.read_slide(outs)


def test_read_visium_barcode_without_position(tmp_path):
    outs = make_outs(tmp_path, header=False)
    pos_file = outs / "spatial" / "tissue_positions_list.csv"
    lines = pos_file.read_text().splitlines()
    pos_file.write_text("\n".join(line for line in lines if "GGGTTTAA" not in line) + "\n")
    with pytest.raises(CoordinateError, match="GGGTTTAA-1"):
        io.read_slide(outs)
