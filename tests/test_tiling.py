"""A slide in spatial tiles (:func:`napari_stlnmf.tiling.deconvolve_tiled`): with the exact halo
each tile's interior gets the whole-slide answer, a halo too small does not, the calibration
measured on a sample stays close, tiles read only their own bins, and the tiles run the same
on a dask LocalCluster."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent / "io"))
from hd_testdata import make_visium_hd

from napari_stlnmf import deconvolve
from napari_stlnmf.errors import StlnmfError
from napari_stlnmf.io import read_slide, spaceranger
from napari_stlnmf.io.spaceranger import TenxH5Columns, read_10x_matrix
from napari_stlnmf.progress import Cancelled
from napari_stlnmf.tiling import deconvolve_tiled, exact_halo, plan_tiles

KEY = "cell_type"
LAYERS = 10  # a short network: its exact halo (14 hops) fits a small slide several times over
GRID = (60, 60)


@pytest.fixture(scope="module")
def hd_slide(tmp_path_factory, demo_reference):
    """A 60 x 60 Visium HD slide of 8 µm bins simulated from the demo reference, with a
    hole of bins outside the tissue; the truth."""
    from napari_stlnmf.simulate import simulate_slide

    rows, cols = np.divmod(np.arange(GRID[0] * GRID[1]), GRID[1])
    xy = np.column_stack([cols, rows]) * 8.0
    truth = simulate_slide(xy, demo_reference, mean_cells=3.0, spacing=8.0, seed=4)
    tissue = ~((np.abs(rows - 30) < 5) & (np.abs(cols - 20) < 5))
    hd = make_visium_hd(
        tmp_path_factory.mktemp("hd"),
        truth.counts.astype(np.int64),
        list(demo_reference.genes),
        grid=GRID,
        base_um=8,
        bin_sizes=(8,),
        in_tissue=tissue,
        mex=False,
    )
    return hd, truth.cell_fractions[tissue]  # the filtered matrix: bins in tissue


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def whole(hd_slide, demo):
    hd, _ = hd_slide
    return _quiet(deconvolve, hd.sample, demo[1], cell_type_key=KEY, n_layers=LAYERS)


def test_exact_halo_gives_the_whole_slide_answer(hd_slide, demo, whole):
    hd, _ = hd_slide
    # calibrated on every spot: the tiles' only difference from one fit is where they are cut
    tiled = _quiet(
        deconvolve_tiled, hd.sample, demo[1], cell_type_key=KEY, n_layers=LAYERS,
        tile_size=25, halo=None,
    )  # fmt: skip
    assert tiled.info["tiling"]["tiles"] == 9
    assert tiled.info["tiling"]["halo_hops"] == exact_halo(LAYERS)
    assert tiled.proportions.index.equals(whole.proportions.index)
    assert (tiled.qc == whole.qc).all()
    assert len(whole.qc) == GRID[0] * GRID[1] - 81  # the filtered matrix: bins in tissue
    for table in ("cell_fractions", "mrna_fractions"):
        a, b = getattr(whole, table).to_numpy(), getattr(tiled, table).to_numpy()
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.nanmax(np.abs(a - b)) < 1e-5, table
    np.testing.assert_allclose(tiled.fit_error, whole.fit_error, atol=1e-5)
    assert "stlnmf_proportions" in tiled.adata.obsm and tiled.adata.X is None


def test_no_halo_changes_the_tiles_borders(hd_slide, demo, whole):
    hd, _ = hd_slide
    run = lambda halo: _quiet(
        deconvolve_tiled, hd.sample, demo[1], cell_type_key=KEY, n_layers=LAYERS,
        tile_size=25, halo=halo,
    )  # fmt: skip
    a = whole.proportions.to_numpy()
    none, some = (np.nanmax(np.abs(run(h).proportions.to_numpy() - a)) for h in (0, 4))
    assert none > 1e-3 and some < 1e-4 < none, (none, some)


def test_calibration_on_a_sample_stays_close(hd_slide, demo, whole):
    hd, truth = hd_slide
    tiled = _quiet(
        deconvolve_tiled, hd.sample, demo[1], cell_type_key=KEY, n_layers=LAYERS,
        tile_size=25, calibration_spots=1200,
    )  # fmt: skip
    assert tiled.info["tiling"]["calibration_spots"] == 1200
    ok = (whole.qc == "ok").to_numpy()
    a, b = whole.proportions.to_numpy()[ok], tiled.proportions.to_numpy()[ok]
    assert np.mean(np.abs(a - b)) < 2e-3
    grid_truth = truth[ok]
    rmse = lambda p: np.sqrt(np.mean((p - grid_truth) ** 2))
    assert rmse(b) < 1.05 * rmse(a), (rmse(a), rmse(b))


def test_a_tile_reads_its_own_bins_only(hd_slide, monkeypatch):
    hd, _ = hd_slide
    path = hd.bin_folder(8) / "filtered_feature_bc_matrix.h5"
    full = read_10x_matrix(path)
    reader = TenxH5Columns(path)
    assert reader.adata.obs_names.equals(full.obs_names)
    assert reader.adata.var_names.equals(full.var_names)
    rng = np.random.default_rng(0)
    for rows in (np.arange(100, 400), rng.permutation(full.n_obs)[:250], np.array([7])):
        part = reader.read(rows)
        assert (part != full.X[rows]).nnz == 0
    # the middle tile of 3 x 3 reads its bins and halo, not the whole matrix
    xy = read_slide(hd.sample).obsm["spatial"]
    tile = plan_tiles(xy, 8 / 0.2738, tile_size=20, halo=2)[4]
    touched = []
    original = spaceranger._h5_matrix_group

    class CountedData:
        def __init__(self, data):
            self.data = data

        def __getitem__(self, where):
            touched.append(where.stop - where.start)
            return self.data[where]

    def counting(f, path):
        grp, *rest = original(f, path)
        datasets = {key: grp[key] for key in ("indptr", "indices")}
        datasets["data"] = CountedData(grp["data"])
        return (datasets, *rest)

    monkeypatch.setattr(spaceranger, "_h5_matrix_group", counting)
    part = reader.read(tile.rows)
    assert (part != full.X[tile.rows]).nnz == 0
    share = sum(touched) / full.X.nnz
    # 24 x 24 bins of 60 x 60 (16 %), in 24 runs of rows each read in one slice
    assert share < 0.2, share


def test_options_a_tiled_run_cannot_take_are_refused(hd_slide, demo):
    hd, _ = hd_slide
    for option in ({"train": True}, {"diagnose": True}, {"library_key": "sample"}):
        with pytest.raises(StlnmfError, match="a tiled run cannot take"):
            deconvolve_tiled(hd.sample, demo[1], cell_type_key=KEY, **option)
    with pytest.raises(StlnmfError, match="calibration_spots"):
        deconvolve_tiled(hd.sample, demo[1], cell_type_key=KEY, calibration_spots=5)


def test_progress_and_cancel_between_tiles(hd_slide, demo):
    hd, _ = hd_slide
    seen = []

    def progress(stage, i, n):
        seen.append((str(stage.value), i, n))

    stop = lambda: sum(s == "deconvolving" for s, *_ in seen) > 2
    with pytest.raises(Cancelled):
        _quiet(
            deconvolve_tiled, hd.sample, demo[1], cell_type_key=KEY, n_layers=LAYERS,
            tile_size=25, progress=progress, should_stop=stop,
        )  # fmt: skip
    tiles = [(i, n) for s, i, n in seen if s == "deconvolving" and n == 9]
    assert tiles[:2] == [(0, 9), (1, 9)]


def test_tiles_on_a_local_cluster_give_the_same_answer(hd_slide, demo):
    pytest.importorskip("distributed", reason="the [distributed] extra is not installed")
    from distributed import Client, LocalCluster

    hd, _ = hd_slide
    options = {"cell_type_key": KEY, "n_layers": LAYERS, "tile_size": 25}
    options["calibration_spots"] = 1500
    here = _quiet(deconvolve_tiled, hd.sample, demo[1], **options)
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with cluster, Client(cluster) as client:
        there = _quiet(deconvolve_tiled, hd.sample, demo[1], client=client, **options)
    np.testing.assert_array_equal(here.proportions.to_numpy(), there.proportions.to_numpy())
    # an AnnData in memory is cut the same way as the folder
    adata = read_slide(hd.sample)
    again = _quiet(deconvolve_tiled, adata, demo[1], **options)
    np.testing.assert_array_equal(here.proportions.to_numpy(), again.proportions.to_numpy())


def test_stlnmf_tiled_writes_the_results_and_maps(hd_slide, demo, tmp_path):
    from PIL import Image

    from napari_stlnmf.cli import main

    hd, truth = hd_slide
    reference = tmp_path / "reference.h5ad"
    demo[1].write_h5ad(reference)
    out = tmp_path / "tiled"
    argv = ["tiled", "--slide", str(hd.sample), "--reference", str(reference)]
    argv += ["--cell-type-key", KEY, "--out", str(out), "--tile-size", "25", "--halo", "4"]
    argv += ["--layers", str(LAYERS), "--quiet"]
    assert _quiet(main, argv) == 0
    table = pd.read_csv(out / "proportions.csv", index_col=0)
    assert len(table) == len(truth) and np.allclose(table.sum(1), 1.0, atol=1e-5)
    # the maps show the bins (squares drawn in data units, not off the axes)
    pixels = np.asarray(Image.open(out / "map_dominant_type.png").convert("RGB"), dtype=int)
    coloured = (pixels.max(2) - pixels.min(2)) > 40
    assert coloured.mean() > 0.2, coloured.mean()
    assert main(argv[:-1] + ["--workers", "0", "--overwrite", "--quiet"]) == 2


def test_the_over_relaxation_is_decided_once_for_the_slide(hd_slide, demo, monkeypatch):
    """A fit that diverges on the whole slide (here: made to, on any part of more than 3,400
    bins while ω > 1) is damped to ω = 1; tiles too small to diverge must use that ω as well,
    not their own, or the stitched answer would depend on where the slide was cut."""
    import napari_stlnmf.model as model_module

    last = {}
    run_layers = model_module.run_layers

    def recording(*args, **kwargs):
        last["omega"] = kwargs["omega"]
        return run_layers(*args, **kwargs)

    monkeypatch.setattr(model_module, "run_layers", recording)
    monkeypatch.setattr(
        model_module, "_bounded", lambda V: last["omega"] <= 1.0 or V.shape[0] < 3400
    )
    hd, _ = hd_slide
    options = {"cell_type_key": KEY, "n_layers": LAYERS}
    whole = _quiet(deconvolve, hd.sample, demo[1], **options)
    tiled = _quiet(deconvolve_tiled, hd.sample, demo[1], tile_size=15, halo=None, **options)
    assert tiled.info["tiling"]["tiles"] == 16
    a, b = whole.proportions.to_numpy(), tiled.proportions.to_numpy()
    assert np.nanmax(np.abs(a - b)) < 1e-5
