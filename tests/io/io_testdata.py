"""Small slides, references and a fake Space Ranger output shared by the io tests."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from conftest import write_10x_h5
from PIL import Image
from scipy import sparse

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


def make_outs(root: Path, *, header: bool) -> Path:
    outs = root / "sample1" / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True)
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        COUNTS,
        BARCODES,
        FEATURE_NAMES,
        FEATURE_IDS,
        FEATURE_TYPES,
        attrs={"software_version": "spaceranger-2.1.0"},
    )
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


def small_slide(dense: bool) -> ad.AnnData:
    X = np.array([[1, 0, 2], [0, 3, 0], [4, 0, 1], [0, 0, 5]], dtype=np.float32)
    adata = ad.AnnData(
        X=X if dense else sparse.csr_matrix(X),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(4)]),
        var=pd.DataFrame(index=["g1", "g2", "g3"]),
    )
    adata.obsm["spatial"] = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    return adata


def assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
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


def small_reference() -> ad.AnnData:
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


def small_signature() -> pd.DataFrame:
    return pd.DataFrame({"T": [1.0, 0.5, 0.0], "B": [0.0, 2.0, 1.0]}, index=["g1", "g2", "g3"])
