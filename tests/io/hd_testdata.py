"""A Visium HD Space Ranger output written in tmp_path, laid out as Space Ranger 3/4 writes it.

``make_visium_hd`` writes ``<sample>/outs/binned_outputs/square_XXXum/`` for several bin sizes
(each with ``filtered_feature_bc_matrix.h5``, the MEX folder ``filtered_feature_bc_matrix/``,
``spatial/tissue_positions.parquet``, ``scalefactors_json.json`` and the tissue images) and,
optionally, Space Ranger 4's ``segmented_outputs/``. Coarser bins are sums of the finest ones,
as Space Ranger bins them; positions list every bin, in tissue or not, the filtered matrices
only the bins in tissue.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from conftest import write_10x_h5
from PIL import Image
from scipy import sparse

MICRONS_PER_PIXEL = 0.2738
ORIGIN_PX = np.array([1500.0, 900.0])  # (x, y) of the array's corner in full-res pixels
HIRES_SCALEF = 0.08
LOWRES_SCALEF = 0.02


@dataclass
class HDOutput:
    sample: Path  # <sample>/, holding outs/
    counts: dict  # bin size -> DataFrame (in-tissue bins x genes), the matrices written
    positions: dict  # bin size -> DataFrame of tissue_positions.parquet (barcode index)

    @property
    def outs(self) -> Path:
        return self.sample / "outs"

    @property
    def binned(self) -> Path:
        return self.outs / "binned_outputs"

    def bin_folder(self, size: int) -> Path:
        return self.binned / f"square_{size:03d}um"


def bin_barcode(size: int, row: int, col: int) -> str:
    return f"s_{size:03d}um_{row:05d}_{col:05d}-1"


def _write_mex(folder: Path, genes_by_bins, barcodes, genes) -> None:
    folder.mkdir(parents=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sparse.coo_matrix(genes_by_bins), field="integer")
    features = pd.DataFrame(
        {"id": [f"ENSG{i:05d}" for i in range(len(genes))], "name": genes}
    ).assign(type="Gene Expression")
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(barcodes).to_csv(folder / "barcodes.tsv.gz", sep="\t", header=False, index=False)


def _write_images(spatial: Path, extent_px: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for key, scalef in (("hires", HIRES_SCALEF), ("lowres", LOWRES_SCALEF)):
        width, height = np.ceil(extent_px * scalef).astype(int) + 4
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(spatial / f"tissue_{key}_image.png")


def make_visium_hd(
    root: Path,
    counts: np.ndarray,
    genes: list[str],
    *,
    grid: tuple[int, int],
    base_um: int = 2,
    bin_sizes: tuple[int, ...] = (2, 8, 16),
    in_tissue: np.ndarray | None = None,
    sample: str = "hd_sample",
    mex: bool = True,
) -> HDOutput:
    """Write an HD output whose finest bins (``base_um``, a ``grid`` of rows x cols) hold
    ``counts`` (bins x genes, row-major over the grid); ``in_tissue`` (per finest bin, default
    all) marks tissue: a coarser bin is in tissue when any of its finest bins is."""
    n_rows, n_cols = grid
    counts = np.asarray(counts)
    assert counts.shape == (n_rows * n_cols, len(genes))
    tissue = np.ones(n_rows * n_cols, bool) if in_tissue is None else np.asarray(in_tissue)
    out = HDOutput(root / sample, {}, {})
    extent_px = np.array([n_cols, n_rows]) * base_um / MICRONS_PER_PIXEL + ORIGIN_PX
    for size in bin_sizes:
        step = size // base_um
        rows, cols = n_rows // step, n_cols // step
        r, c = np.divmod(np.arange(n_rows * n_cols), n_cols)
        keep = (r < rows * step) & (c < cols * step)  # an incomplete last block is no bin
        block = (r[keep] // step) * cols + c[keep] // step
        summed = np.zeros((rows * cols, len(genes)), dtype=np.int64)
        np.add.at(summed, block, counts[keep])
        tissue_bins = np.zeros(rows * cols, bool)
        np.logical_or.at(tissue_bins, block, tissue[keep])
        br, bc = np.divmod(np.arange(rows * cols), cols)
        barcodes = [bin_barcode(size, i, j) for i, j in zip(br, bc)]
        centre_um = np.column_stack([(bc + 0.5) * size, (br + 0.5) * size])
        xy = ORIGIN_PX + centre_um / MICRONS_PER_PIXEL
        positions = pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": tissue_bins.astype(np.int32),
                "array_row": br.astype(np.int32),
                "array_col": bc.astype(np.int32),
                "pxl_row_in_fullres": xy[:, 1],
                "pxl_col_in_fullres": xy[:, 0],
            }
        )
        folder = out.bin_folder(size)
        spatial = folder / "spatial"
        spatial.mkdir(parents=True)
        positions.to_parquet(spatial / "tissue_positions.parquet", index=False)
        scalefactors = {
            "spot_diameter_fullres": size / MICRONS_PER_PIXEL,
            "bin_size_um": float(size),
            "microns_per_pixel": MICRONS_PER_PIXEL,
            "regist_target_img_scalef": HIRES_SCALEF,
            "tissue_lowres_scalef": LOWRES_SCALEF,
            "fiducial_diameter_fullres": 1000.0,
            "tissue_hires_scalef": HIRES_SCALEF,
        }
        (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
        _write_images(spatial, extent_px, seed=size)
        filtered = [b for b, t in zip(barcodes, tissue_bins) if t]
        matrix = summed[tissue_bins]
        write_10x_h5(
            folder / "filtered_feature_bc_matrix.h5",
            matrix.T.astype(np.int32),
            filtered,
            genes,
            [f"ENSG{i:05d}" for i in range(len(genes))],
            ["Gene Expression"] * len(genes),
            attrs={"software_version": "spaceranger-3.1.1"},
        )
        if mex:
            _write_mex(folder / "filtered_feature_bc_matrix", matrix.T, filtered, genes)
        out.counts[size] = pd.DataFrame(matrix, index=filtered, columns=genes)
        out.positions[size] = positions.set_index("barcode")
    # outs/spatial/ holds the images too
    (out.outs / "spatial").mkdir(parents=True, exist_ok=True)
    _write_images(out.outs / "spatial", extent_px, seed=0)
    return out


def square_cell(cx: float, cy: float, half: float) -> list:
    """A closed square outline (GeoJSON ring) of side 2 * half around (cx, cy)."""
    return [
        [cx - half, cy - half],
        [cx + half, cy - half],
        [cx + half, cy + half],
        [cx - half, cy + half],
        [cx - half, cy - half],
    ]


def add_segmented_outputs(
    out: HDOutput, centres: np.ndarray, halves: np.ndarray, counts: np.ndarray, genes
) -> Path:
    """Space Ranger 4's ``segmented_outputs/``: one square cell outline per centre (x, y px)
    in ``cell_segmentations.geojson``, ``filtered_feature_cell_matrix.h5`` and the scale
    factors; cell ids start at 1, barcodes are ``cellid_000000001-1``."""
    segmented = out.outs / "segmented_outputs"
    (segmented / "spatial").mkdir(parents=True)
    ids = np.arange(1, len(centres) + 1)
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square_cell(x, y, h)]},
            "properties": {"cell_id": int(i)},
        }
        for i, (x, y), h in zip(ids, centres, halves)
    ]
    (segmented / "cell_segmentations.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    barcodes = [f"cellid_{i:09d}-1" for i in ids]
    write_10x_h5(
        segmented / "filtered_feature_cell_matrix.h5",
        np.asarray(counts).T.astype(np.int32),
        barcodes,
        list(genes),
        [f"ENSG{i:05d}" for i in range(len(genes))],
        ["Gene Expression"] * len(genes),
    )
    scalefactors = {
        "spot_diameter_fullres": 2 / MICRONS_PER_PIXEL,
        "bin_size_um": 2.0,
        "microns_per_pixel": MICRONS_PER_PIXEL,
        "tissue_hires_scalef": HIRES_SCALEF,
        "tissue_lowres_scalef": LOWRES_SCALEF,
    }
    (segmented / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    return segmented
