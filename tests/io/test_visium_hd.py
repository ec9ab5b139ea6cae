"""napari_stlnmf.io.visium_hd: Visium HD Space Ranger output (bins of a chosen size, segmented
cells), on HD folders written by the tests (hd_testdata)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hd_testdata import (
    HIRES_SCALEF,
    MICRONS_PER_PIXEL,
    ORIGIN_PX,
    add_segmented_outputs,
    make_visium_hd,
)
from io_testdata import assert_same
from scipy import sparse

from napari_stlnmf import io
from napari_stlnmf.errors import CoordinateError, FileFormatError

GRID = (24, 32)  # 2 µm bins: 768 of them, 48 of 8 µm, 12 of 16 µm
GENES = [f"Gene{i}" for i in range(15)]


@pytest.fixture
def hd(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, size=(GRID[0] * GRID[1], len(GENES)))
    counts[:, 0] += 1  # no empty bin: every bin is a node of the graph
    r, c = np.divmod(np.arange(GRID[0] * GRID[1]), GRID[1])
    in_tissue = ~((r < 4) & (c < 8))  # two 8 µm bins of a corner are off the tissue
    return make_visium_hd(tmp_path, counts, GENES, grid=GRID, in_tissue=in_tissue)


def _dense(adata):
    return adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)


def test_every_accepted_folder_opens_the_same_8um_bins(hd):
    folders = [hd.sample, hd.outs, hd.binned, hd.bin_folder(8)]
    for folder in folders:
        assert io.find_slide_format(folder).name == "visium_hd"
    slides = [io.read_slide(folder) for folder in folders]
    for other in slides[1:]:
        assert_same(slides[0], other)
        assert other.uns["spatial"].keys() == {"hd_sample"}
    adata = slides[0]
    expected = hd.counts[8]
    assert list(adata.obs_names) == list(expected.index)
    assert list(adata.var_names) == GENES
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(_dense(adata), expected.to_numpy())
    io.validate_slide(adata)


def test_positions_scale_factors_and_in_tissue(hd):
    adata = io.read_slide(hd.binned, bin_size=8)
    positions = hd.positions[8].loc[adata.obs_names]
    np.testing.assert_allclose(
        adata.obsm["spatial"], positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]]
    )
    # bin (row, col) sits at the array origin + its centre in µm / µm per pixel
    row, col = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    np.testing.assert_allclose(
        adata.obsm["spatial"],
        ORIGIN_PX + np.column_stack([col + 0.5, row + 0.5]) * 8 / MICRONS_PER_PIXEL,
    )
    assert adata.obs_names[0] == "s_008um_00000_00002-1"  # 10x's barcode layout
    assert (adata.obs["in_tissue"] == 1).all()
    assert (hd.positions[8]["in_tissue"] == 0).sum() == 2  # listed, but not in the matrix
    assert adata.n_obs == len(hd.positions[8]) - 2

    library_id, lib = io.get_library(adata)
    assert library_id == "hd_sample"  # the sample folder, whichever folder was opened
    scalefactors = lib["scalefactors"]
    assert scalefactors["bin_size_um"] == 8.0
    assert scalefactors["microns_per_pixel"] == MICRONS_PER_PIXEL
    assert io.square_bin_size(adata) == pytest.approx(8 / MICRONS_PER_PIXEL)
    assert io.spot_diameter(adata) == pytest.approx(8 / MICRONS_PER_PIXEL)
    assert set(lib["images"]) == {"hires", "lowres"}
    assert lib["metadata"]["software_version"] == "spaceranger-3.1.1"
    image, scalef, _ = io.get_image(adata)
    assert scalef == HIRES_SCALEF and image.dtype == np.uint8
    io.check_image_covers_spots(adata)


def test_bin_size_chooses_the_bins(hd):
    for size in (2, 8, 16):
        adata = io.read_slide(hd.outs, bin_size=size)
        np.testing.assert_array_equal(_dense(adata), hd.counts[size].to_numpy())
        assert io.square_bin_size(adata) == pytest.approx(size / MICRONS_PER_PIXEL)
    # 8 µm bins are sums of 2 µm ones, and the off-tissue corner is two whole 8 µm bins
    totals = [io.read_slide(hd.outs, bin_size=s).X.sum() for s in (2, 8)]
    assert totals[0] == totals[1] == hd.counts[2].to_numpy().sum()
    assert io.read_slide(hd.bin_folder(16)).n_obs == len(hd.counts[16])  # its own bins
    assert io.read_slide(hd.outs, bin_size=16.0).n_obs == len(hd.counts[16])


def test_missing_bin_size_lists_the_present_ones(hd):
    with pytest.raises(FileFormatError, match=r"no 4 µm bins.*present are 2, 8, 16 µm"):
        io.read_slide(hd.sample, bin_size=4)
    with pytest.raises(FileFormatError, match="holds the 16 µm bins, not 8 µm"):
        io.read_slide(hd.bin_folder(16), bin_size=8)
    with pytest.raises(FileFormatError, match="whole number of micrometres"):
        io.read_slide(hd.outs, bin_size=2.5)
    # no 8 µm folder: the default names what there is
    for path in hd.bin_folder(8).rglob("*"):
        if path.is_file():
            path.unlink()
    for path in sorted(hd.bin_folder(8).rglob("*"), reverse=True):
        path.rmdir()
    hd.bin_folder(8).rmdir()
    with pytest.raises(FileFormatError, match=r"no 8 µm bins.*present are 2, 16 µm"):
        io.read_slide(hd.outs)


def test_mex_matrix_reads_as_the_h5(hd):
    from_h5 = io.read_slide(hd.outs)
    (hd.bin_folder(8) / "filtered_feature_bc_matrix.h5").unlink()
    from_mex = io.read_slide(hd.outs)
    assert_same(from_h5, from_mex)
    assert list(from_mex.var["gene_ids"]) == list(from_h5.var["gene_ids"])
    assert list(from_mex.var["feature_types"]) == ["Gene Expression"] * len(GENES)
    # neither matrix: the error names both ways of storing it
    for name in ("barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz"):
        (hd.bin_folder(8) / "filtered_feature_bc_matrix" / name).unlink()
    (hd.bin_folder(8) / "filtered_feature_bc_matrix").rmdir()
    assert io.find_slide_format(hd.bin_folder(8)) is None
    with pytest.raises(FileFormatError, match=r"filtered_feature_bc_matrix\.h5 or the folder"):
        io.read_slide(hd.outs)


def test_classic_visium_reads_a_mex_folder(tmp_path):
    from io_testdata import make_outs

    outs = make_outs(tmp_path, header=True)
    from_h5 = io.read_slide(outs)
    bins = make_visium_hd(
        tmp_path / "hd", np.ones((16, 3), int), ["a", "b", "c"], grid=(4, 4), bin_sizes=(2,)
    )
    # the HD fixture's MEX writer, on the classic matrix: write it, then drop the .h5
    from hd_testdata import _write_mex

    genes_by_spots = sparse.csc_matrix(from_h5.X.T).toarray().astype(np.int64)
    _write_mex(outs / "filtered_feature_bc_matrix", genes_by_spots, from_h5.obs_names, ["x"] * 3)
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    assert io.find_slide_format(outs).name == "spaceranger"
    from_mex = io.read_slide(outs)
    np.testing.assert_array_equal(_dense(from_mex), _dense(from_h5))
    np.testing.assert_array_equal(from_mex.obsm["spatial"], from_h5.obsm["spatial"])
    assert list(from_mex.obs_names) == list(from_h5.obs_names)
    assert io.find_slide_format(bins.sample).name == "visium_hd"


def test_broken_files_give_our_errors_not_tracebacks(hd):
    h5 = hd.bin_folder(8) / "filtered_feature_bc_matrix.h5"
    h5.write_bytes(h5.read_bytes()[:100])  # a truncated copy
    with pytest.raises(FileFormatError, match="truncated"):
        io.read_slide(hd.outs)
    parquet = hd.bin_folder(16) / "spatial" / "tissue_positions.parquet"
    parquet.write_bytes(b"not parquet")
    with pytest.raises(FileFormatError, match="parquet"):
        io.read_slide(hd.outs, bin_size=16)
    positions = hd.positions[2].reset_index().iloc[:-5]  # in-tissue bins without a position
    positions.to_parquet(hd.bin_folder(2) / "spatial" / "tissue_positions.parquet")
    with pytest.raises(CoordinateError, match="5 of 736 barcodes"):
        io.read_slide(hd.outs, bin_size=2)


def test_segmented_outputs_read_as_cells(hd):
    rng = np.random.default_rng(3)
    centres = ORIGIN_PX + rng.uniform(20, 150, size=(30, 2))
    halves = rng.uniform(10, 20, size=30)  # squares of side 2 * half pixels
    counts = rng.poisson(3.0, size=(30, len(GENES)))
    segmented = add_segmented_outputs(hd, centres, halves, counts, GENES)
    assert io.find_slide_format(segmented).name == "visium_hd"
    cells = io.read_slide(segmented)
    assert cells.obs_names[0] == "cellid_000000001-1"
    np.testing.assert_array_equal(_dense(cells), counts)
    np.testing.assert_allclose(cells.obsm["spatial"], centres)  # polygon centroids
    np.testing.assert_allclose(cells.obs["cell_area"], (2 * halves) ** 2)
    np.testing.assert_allclose(cells.obs["cell_diameter"], 2 * np.sqrt((2 * halves) ** 2 / np.pi))
    _, lib = io.get_library(cells)
    assert lib["scalefactors"]["microns_per_pixel"] == MICRONS_PER_PIXEL
    assert io.square_bin_size(cells) is None  # cells are no square bins
    assert io.spot_diameter(cells) == pytest.approx(np.median(cells.obs["cell_diameter"]))
    assert set(lib["images"]) == {"hires", "lowres"}  # from outs/spatial/
    # the sample folder still opens the bins; cells take a bin size for none
    assert io.square_bin_size(io.read_slide(hd.sample)) is not None
    with pytest.raises(FileFormatError, match="segmented cells, not bins"):
        io.read_slide(segmented, bin_size=8)


def test_layers_draw_bins_as_squares_of_their_size(hd):
    from napari_stlnmf.layers import result_layers, slide_for_deconvolution, slide_layers

    adata = io.read_slide(hd.outs, bin_size=16)
    side = 16 / MICRONS_PER_PIXEL
    image, points = slide_layers(adata)
    assert points[1]["symbol"] == "square" and points[1]["size"] == pytest.approx(side)
    assert image[1]["scale"] == pytest.approx((1 / HIRES_SCALEF, 1 / HIRES_SCALEF))
    props = pd.DataFrame({"a": 0.3, "b": 0.7}, index=adata.obs_names)
    # results: the bins are the pixels of rasters, each pixel a bin wide, on its bin's centre
    layers = result_layers(props, None, None, adata)
    assert [kind for _, _, kind in layers] == ["image", "labels", "image"]
    yx = adata.obsm["spatial"][:, ::-1]
    for data, kwargs, _ in layers:
        affine = kwargs["affine"]
        np.testing.assert_allclose(np.abs(np.linalg.eigvals(affine[:2, :2])), side, rtol=1e-6)
        grid = kwargs["metadata"]["stlnmf_bins"]
        centres = np.c_[grid.rows, grid.cols] @ affine[:2, :2].T + affine[:2, 2]
        np.testing.assert_allclose(centres, yx, atol=1e-6 * side)
    # drawn as Points on request: squares of the bins' side
    for _, kwargs, _ in result_layers(props, None, None, adata, rasterise=False):
        assert kwargs["symbol"] == "square" and kwargs["size"] == pytest.approx(side)
    # the widget's copy with another image layer keeps the bins' size
    img = io.get_library(adata)[1]["images"]["hires"]
    copy = slide_for_deconvolution(adata, img, scale=(1 / HIRES_SCALEF, 1 / HIRES_SCALEF))
    assert io.square_bin_size(copy) == pytest.approx(side)
    # the PNG maps draw the same squares, in image pixels
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_stlnmf.plotting import draw_spot_map

    fig, ax = plt.subplots()
    try:
        squares = draw_spot_map(ax, adata, props["a"].to_numpy(), cmap="viridis", vmin=0, vmax=1)
        corners = np.asarray(squares.get_paths()[0].vertices)[:4]
        np.testing.assert_allclose(np.ptp(corners, axis=0), side * HIRES_SCALEF)
        np.testing.assert_allclose(corners.mean(0), adata.obsm["spatial"][0] * HIRES_SCALEF)
    finally:
        plt.close(fig)
    # Visium spots stay discs
    from io_testdata import make_outs

    visium = io.read_slide(make_outs(hd.sample.parent / "visium", header=True))
    assert slide_layers(visium)[-1][1]["symbol"] == "disc"


def test_napari_reader_opens_hd_folders_at_8um(hd):
    from napari_stlnmf._napari.reader import napari_get_reader, read_slide_layers

    for folder in (hd.sample, hd.outs, hd.binned):
        reader = napari_get_reader(str(folder))
        assert callable(reader)
        layers = reader(str(folder))
        points = layers[-1]
        assert points[1]["name"] == "hd_sample 8 µm spots"
        assert len(points[0]) == len(hd.counts[8])
    assert len(read_slide_layers(hd.outs, bin_size=2)[-1][0]) == len(hd.counts[2])


def test_graph_links_square_bins_to_their_ring(hd):
    from types import SimpleNamespace

    from napari_stlnmf.graph import build_graph
    from napari_stlnmf.pipeline import DeconvolutionSettings, build_spot_graph

    adata = io.read_slide(hd.outs, bin_size=2)
    prepared = SimpleNamespace(spot_mask=np.ones(adata.n_obs, bool))  # every bin kept
    xy = adata.obsm["spatial"]
    rows, cols = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    # away from the array's edges and from the off-tissue corner (rows < 4, cols < 8)
    interior = (rows > 1) & (rows < GRID[0] - 2) & (cols > 9) & (cols < GRID[1] - 2)
    for n_neighbors, ring in ((6, 8), (8, 8), (4, 4)):
        settings = DeconvolutionSettings(n_neighbors=n_neighbors, use_image=False)
        spots = build_spot_graph(adata, prepared, settings)
        degree = np.bincount(spots.graph.rows, minlength=spots.graph.n_spots)
        assert (degree[interior] == ring).all(), (n_neighbors, np.unique(degree[interior]))
        assert spots.graph.spacing == pytest.approx(2 / MICRONS_PER_PIXEL)
    # without the bins' size (a plain layout), 6 neighbours take an arbitrary 2 of 4 diagonals
    plain = build_graph(xy, n_neighbors=6)
    assert not (np.bincount(plain.rows)[interior] == 8).all()


def test_deconvolve_runs_on_a_simulated_hd_folder(tmp_path, demo, demo_reference):
    from napari_stlnmf import deconvolve
    from napari_stlnmf.baselines import nnls_proportions
    from napari_stlnmf.cli import main
    from napari_stlnmf.simulate import simulate_slide

    grid = (18, 18)
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    xy = np.column_stack([cols, rows]) * 8.0
    truth = simulate_slide(xy, demo_reference, mean_cells=3.0, spacing=8.0, seed=1)
    genes = list(demo_reference.genes)
    hd = make_visium_hd(
        tmp_path, truth.counts.astype(np.int64), genes, grid=grid, base_um=8, bin_sizes=(8, 16)
    )
    _, reference = demo
    result = deconvolve(hd.sample, reference, cell_type_key="cell_type", bin_size=8)
    types = list(demo_reference.cell_types)
    estimate = result.proportions.loc[hd.counts[8].index, types].to_numpy()
    assert list(result.proportions.columns) == types
    np.testing.assert_allclose(estimate.sum(1), 1.0, atol=1e-5)
    rmse = np.sqrt(np.mean((estimate - truth.cell_fractions) ** 2))
    uniform = np.sqrt(np.mean((1 / len(types) - truth.cell_fractions) ** 2))
    nnls = nnls_proportions(result.adata, reference, cell_type_key="cell_type")
    nnls = nnls.loc[hd.counts[8].index, types].to_numpy()
    nnls_rmse = np.sqrt(np.mean((nnls - truth.cell_fractions) ** 2))
    # 0.030 against 0.30 for uniform guesses and 0.045 for per-bin NNLS when written
    assert rmse < 0.25 * uniform and rmse < nnls_rmse, (rmse, uniform, nnls_rmse)
    assert result.info["n_spots_used"] == grid[0] * grid[1]
    assert result.adata.uns["spatial"]["hd_sample"]["scalefactors"]["bin_size_um"] == 8.0
    with pytest.raises(FileFormatError, match="present are 8, 16"):
        deconvolve(hd.outs, reference, cell_type_key="cell_type", bin_size=2)
    # the CLI: --bin-size picks the 16 µm bins
    out = tmp_path / "cli"
    reference.write_h5ad(tmp_path / "reference.h5ad")
    argv = ["run", "--slide", str(hd.outs), "--reference", str(tmp_path / "reference.h5ad")]
    argv += ["--cell-type-key", "cell_type", "--bin-size", "16", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = pd.read_csv(out / "proportions.csv", index_col=0)
    assert len(table) == len(hd.counts[16])
