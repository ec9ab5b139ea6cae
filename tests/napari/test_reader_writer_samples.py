"""napari reader, writer and sample data (headless; reader/writer need no GUI)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import write_10x_h5

napari = pytest.importorskip("napari")

from napari_stlnmf import deconvolve
from napari_stlnmf._napari.reader import napari_get_reader
from napari_stlnmf._napari.sample_data import make_demo_sample, make_histology_sample
from napari_stlnmf._napari.writer import NoResultsToExport, write_proportions
from napari_stlnmf.datasets import DEMO_REFERENCE, load_demo
from napari_stlnmf.errors import StlnmfError
from napari_stlnmf.layers import (
    RESULT_TAG,
    SLIDE_TAG,
    result_layers,
    slide_for_deconvolution,
    slide_layers,
)


@pytest.fixture(scope="module")
def demo_result():
    slide, reference = load_demo()
    return slide, deconvolve(slide, reference, cell_type_key="cell_type", train=False)


def _write_visium(folder, slide):
    """A minimal Space Ranger outs/ folder (10x HDF5 matrix + spatial/) from an AnnData."""
    import json

    from PIL import Image
    from scipy import sparse

    outs = folder / "outs"
    (outs / "spatial").mkdir(parents=True)
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        sparse.csr_matrix(slide.X).T.astype(np.int32),
        slide.obs_names,
        slide.var_names,
        slide.var_names,
        ["Gene Expression"] * slide.n_vars,
    )
    lib = next(iter(slide.uns["spatial"].values()))
    xy = slide.obsm["spatial"]
    pos = pd.DataFrame(
        {
            "barcode": slide.obs_names,
            "in_tissue": 1,
            "array_row": 0,
            "array_col": 0,
            "pxl_row_in_fullres": xy[:, 1].round().astype(int),
            "pxl_col_in_fullres": xy[:, 0].round().astype(int),
        }
    )
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    Image.fromarray(lib["images"]["hires"]).save(outs / "spatial" / "tissue_hires_image.png")
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(lib["scalefactors"]))
    return outs


def test_get_reader_claims_only_slides(tmp_path):
    slide, _ = load_demo()
    assert napari_get_reader(str(tmp_path / "missing.h5ad")) is None
    assert napari_get_reader(str(tmp_path)) is None  # empty folder
    assert napari_get_reader(str(DEMO_REFERENCE)) is None  # reference: no obsm['spatial']
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    assert napari_get_reader(str(tmp_path / "junk.h5ad")) is None
    assert napari_get_reader(["a.h5ad", "b.h5ad"]) is None
    slide.write_h5ad(tmp_path / "slide.h5ad")
    assert callable(napari_get_reader(str(tmp_path / "slide.h5ad")))


def test_reader_space_ranger_folder(tmp_path):
    slide, _ = load_demo()
    outs = _write_visium(tmp_path / "sample1", slide)
    for path in (outs, outs.parent):
        reader = napari_get_reader(str(path))
        assert callable(reader)
        layers = reader(str(path))
        kinds = [kind for _, _, kind in layers]
        assert kinds == ["image", "points"]
        (_, img_kw, _), (pts, pts_kw, _) = layers
        scalef = next(iter(slide.uns["spatial"].values()))["scalefactors"]["tissue_hires_scalef"]
        np.testing.assert_allclose(img_kw["scale"], [1 / scalef] * 2)
        np.testing.assert_allclose(pts, slide.obsm["spatial"][:, ::-1].round())
        assert list(pts_kw["features"]["barcode"]) == list(slide.obs_names)
        assert pts_kw["metadata"]["adata"].n_obs == slide.n_obs
        assert pts_kw["metadata"]["path"] == str(path)
        assert (
            img_kw["metadata"][SLIDE_TAG]["slide_id"] == pts_kw["metadata"][SLIDE_TAG]["slide_id"]
        )


def test_viewer_opens_slide_with_plugin(make_napari_viewer, tmp_path):
    slide, _ = load_demo()
    slide.write_h5ad(tmp_path / "slide.h5ad")
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "slide.h5ad"), plugin="napari-stlnmf")
    assert [type(layer).__name__ for layer in layers] == ["Image", "Points"]


def test_writer_round_trip(make_napari_viewer, demo_result, tmp_path):
    slide, result = demo_result
    viewer = make_napari_viewer()
    for data, kwargs, kind in result_layers(
        result.proportions, result.fit_error, result.qc, result.adata, annotated=result.adata
    ):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    first = str(result.proportions.columns[0])

    # CSV: one row per barcode, all types + dominant + fit error + qc
    # (napari's File > Save Selected Layers with the plugin's writer)
    viewer.layers.selection = {viewer.layers[first]}
    csv = tmp_path / "proportions.csv"
    written = viewer.layers.save(str(csv), selected=True, plugin="napari-stlnmf")
    assert written == [str(csv)]
    table = pd.read_csv(csv, index_col="barcode")
    assert list(table.index) == list(slide.obs_names)
    np.testing.assert_allclose(
        table[result.proportions.columns].to_numpy(),
        result.proportions.to_numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    assert {"dominant", "dominant_proportion", "fit_error", "qc"} <= set(table.columns)

    h5 = tmp_path / "result.h5ad"
    viewer.layers.save(str(h5), selected=True, plugin="napari-stlnmf")
    assert h5.is_file()

    # read back: image + spots + the same maps
    reader = napari_get_reader(str(h5))
    assert callable(reader)
    layers = reader(str(h5))
    names = [kw["name"] for _, kw, _ in layers]
    # named by the file, as the slide it came from
    assert {f"result · {n}" for n in (first, "dominant cell type", "fit error")} <= set(names)
    back = next(kw for _, kw, _ in layers if kw["name"] == f"result · {first}")
    np.testing.assert_allclose(
        back["features"][first].to_numpy(), result.proportions[first].to_numpy(), equal_nan=True
    )
    assert back["metadata"][RESULT_TAG]["role"] == "cell_type"


def test_writer_refuses_plain_layers(tmp_path):
    with pytest.raises(NoResultsToExport, match="no STL NMF results"):
        write_proportions(
            str(tmp_path / "x.csv"),
            np.zeros((2, 2)),
            {"name": "spots", "features": pd.DataFrame(), "metadata": {}},
        )
    # not a ValueError: napari's save drops those silently
    assert not issubclass(NoResultsToExport, ValueError)


def test_writer_is_offered_for_several_layers_and_its_refusal_reaches_the_user(
    make_napari_viewer, demo_result, tmp_path
):
    from napari.plugins._npe2 import file_extensions_string_for_layers

    slide, result = demo_result
    viewer = make_napari_viewer()
    spots = viewer.add_points(slide.obsm["spatial"][:, ::-1], name="spots")
    for data, kwargs, kind in result_layers(
        result.proportions, result.fit_error, result.qc, result.adata, annotated=result.adata
    ):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    first = str(result.proportions.columns[0])
    both = [spots, viewer.layers[first]]
    _, writers = file_extensions_string_for_layers(both)
    assert "napari-stlnmf" in [w.plugin_name for w in writers]
    viewer.layers.selection = set(both)
    csv = tmp_path / "several.csv"
    assert viewer.layers.save(str(csv), selected=True, plugin="napari-stlnmf") == [str(csv)]
    table = pd.read_csv(csv, index_col="barcode")
    assert list(table.index) == list(slide.obs_names) and first in table.columns
    # only plain layers: the plugin's own message, not napari's "no writer found" warning
    viewer.layers.selection = {spots}
    with pytest.raises(NoResultsToExport, match="'spots' holds no STL NMF results"):
        viewer.layers.save(str(tmp_path / "plain.csv"), selected=True, plugin="napari-stlnmf")
    assert not (tmp_path / "plain.csv").exists()


def test_get_reader_imports_neither_torch_nor_the_core(tmp_path):
    """napari asks the reader about every file it opens: that must stay cheap."""
    import subprocess
    import sys

    slide, _ = load_demo()
    slide.write_h5ad(tmp_path / "slide.h5ad")
    code = (
        "import sys\n"
        "from napari_stlnmf._napari.reader import napari_get_reader\n"
        f"assert napari_get_reader({str(tmp_path / 'slide.h5ad')!r}) is not None\n"
        f"assert napari_get_reader({str(DEMO_REFERENCE)!r}) is None\n"
        "heavy = [m for m in ('torch', 'napari_stlnmf.api', 'anndata') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_readme_menu_paths_match_the_manifest():
    """napari 0.9 names a plugin's only widget '<widget> (<plugin display name>)' in Plugins,
    and puts several samples in File > Open Sample > <plugin display name>."""
    from pathlib import Path

    import yaml
    from napari.plugins import menu_item_template

    root = Path(__file__).resolve().parents[2]
    manifest = yaml.safe_load((root / "napari.yaml").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    contributions = manifest["contributions"]
    (widget,) = contributions["widgets"]
    plugin = manifest["display_name"]
    title = menu_item_template.format(plugin, widget["display_name"])
    assert f"*Plugins → {title}*" in readme
    assert len(contributions["sample_data"]) > 1
    assert f"File → Open Sample → {plugin}" in readme
    for sample in contributions["sample_data"]:
        if sample["key"] == "histology":  # real tissue, synthetic expression and types
            assert "synthetic" in sample["display_name"].lower()
            assert f"{plugin} → {sample['display_name']}" in readme


@pytest.mark.parametrize("make", [make_demo_sample, make_histology_sample])
def test_samples_are_layer_tuples(make):
    layers = make()
    assert [kind for _, _, kind in layers] == ["image", "points"]
    meta = layers[1][1]["metadata"]
    assert meta["adata"].n_obs == len(layers[1][0])
    assert meta["reference"] == str(DEMO_REFERENCE)


def test_histology_sample_is_deterministic_and_fast():
    import time

    from napari_stlnmf.histology import make_histology_slide

    make_histology_slide()  # imports
    t0 = time.perf_counter()
    a, _ = make_histology_slide(seed=0)
    assert time.perf_counter() - t0 < 2.0
    b, _ = make_histology_slide(seed=0)
    assert (a.X != b.X).nnz == 0
    assert a.obsm["spatial"].shape == (4235, 2)
    lib = next(iter(a.uns["spatial"].values()))
    assert lib["images"]["lowres"].shape == (600, 600, 3)
    assert "SIMULATED" in lib["metadata"]["source"]


def test_slide_for_deconvolution_uses_other_image():
    slide, _ = load_demo()
    lib = next(iter(slide.uns["spatial"].values()))
    img = lib["images"]["hires"]
    scalef = lib["scalefactors"]["tissue_hires_scalef"]
    out = slide_for_deconvolution(slide, img[::2, ::2], scale=(2 / scalef, 2 / scalef))
    new_lib = next(iter(out.uns["spatial"].values()))
    assert new_lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(scalef / 2)
    assert out.X is slide.X
    with pytest.raises(StlnmfError):
        slide_for_deconvolution(slide, img, scale=(1 / scalef, 2 / scalef))
    with pytest.raises(StlnmfError):  # the wrong scale: spots fall off the image
        slide_for_deconvolution(slide, img, scale=(1.0, 1.0))
    assert slide_for_deconvolution(slide, None) is slide


def test_slide_layers_without_image():
    slide, _ = load_demo()
    del slide.uns["spatial"]
    layers = slide_layers(slide, name="x")
    assert [kind for _, _, kind in layers] == ["points"]
    assert layers[0][1]["size"] > 0


def test_legend_gives_the_fit_error_scale():
    from napari_stlnmf._napari.legend import legend_html

    html = legend_html(["Astro", "Neuron"], fit_error_max=0.563)
    assert "fit error" in html and ">0&nbsp;<" in html and "0.56" in html
    assert "Astro" in html and "Neuron" in html
    assert "0.56" not in legend_html(["Astro"])  # no fit error: no scale
