"""Several samples in one AnnData, spots outside tissue, and the per-type obs columns."""

import anndata as ad
import numpy as np
import pytest

from napari_stlnmf import deconvolve
from napari_stlnmf._constants import PROPORTIONS_KEY, QC_KEY
from napari_stlnmf.errors import CoordinateError, StlnmfError

KEY = "cell_type"


def _second_sample(slide: ad.AnnData) -> ad.AnnData:
    """Another tissue on the SAME coordinates: the demo's expression mirrored left to right, so
    a graph across samples would link spots of different composition."""
    other = slide.copy()
    xy = np.asarray(slide.obsm["spatial"], dtype=float)
    mirrored = np.column_stack([xy[:, 0].max() + xy[:, 0].min() - xy[:, 0], xy[:, 1]])
    nearest = ((mirrored[:, None, :] - xy[None, :, :]) ** 2).sum(2).argmin(1)
    other.X = slide.X[nearest]
    other.obsm["true_proportions"] = (
        slide.obsm["true_proportions"].iloc[nearest].set_axis(slide.obs_names)
    )
    other.obs_names = [f"B_{s}" for s in slide.obs_names]
    return other


@pytest.fixture(scope="module")
def two_samples(demo):
    slide, reference = demo
    first = slide.copy()
    first.obs_names = [f"A_{s}" for s in slide.obs_names]
    second = _second_sample(slide)
    both = ad.concat({"A": first, "B": second}, label="sample", uns_merge="first")
    both.obsm["spatial"] = np.vstack([first.obsm["spatial"], second.obsm["spatial"]])
    return both, first, second, reference


def test_each_library_gets_the_result_it_gets_alone(two_samples):
    both, first, second, reference = two_samples
    together = deconvolve(both, reference, cell_type_key=KEY, library_key="sample")
    assert set(together.info["libraries"]) == {"A", "B"}
    for name, alone_slide in (("A", first), ("B", second)):
        alone = deconvolve(alone_slide, reference, cell_type_key=KEY)
        mine = together.proportions.loc[alone_slide.obs_names]
        np.testing.assert_allclose(mine.to_numpy(), alone.proportions.to_numpy(), atol=1e-6)
        # no edges across samples: each library's graph is its own slide's
        assert (
            together.info["libraries"][name]["graph"]["n_edges"] == alone.info["graph"]["n_edges"]
        )
    assert together.info["n_spots_used"] == both.n_obs


def test_stacked_samples_without_library_key_point_to_it(two_samples):
    both, _, _, reference = two_samples
    with pytest.raises(CoordinateError, match="library_key"):
        deconvolve(both, reference, cell_type_key=KEY)


def test_spots_outside_tissue_are_left_out_and_flagged(demo):
    slide, reference = demo
    flagged = slide.copy()
    outside = np.zeros(slide.n_obs, dtype=bool)
    outside[::7] = True
    flagged.obs["in_tissue"] = np.where(outside, 0, 1)
    result = deconvolve(flagged, reference, cell_type_key=KEY)
    assert result.proportions[outside].isna().all().all()
    assert (result.qc[outside] == "outside tissue").all()
    assert (result.qc[~outside] == "ok").all()
    assert result.info["n_spots_outside_tissue"] == int(outside.sum())
    tissue_only = deconvolve(slide[~outside].copy(), reference, cell_type_key=KEY)
    np.testing.assert_allclose(
        result.proportions[~outside].to_numpy(), tissue_only.proportions.to_numpy(), atol=1e-6
    )
    assert "in_tissue" in flagged.obs and flagged.n_obs == slide.n_obs  # input untouched


def test_results_as_obs_columns_per_type_and_dominant_type(demo):
    slide, reference = demo
    result = deconvolve(slide, reference, cell_type_key=KEY, obs_prefix="deconv_")
    obs = result.adata.obs
    for cell_type in result.proportions.columns:
        np.testing.assert_array_equal(
            obs[f"deconv_{cell_type}"].to_numpy(), result.proportions[cell_type].to_numpy()
        )
    dominant = result.proportions.idxmax(axis=1)
    assert (obs["deconv_dominant_type"].astype(str) == dominant.astype(str)).all()
    assert list(obs["deconv_dominant_type"].cat.categories) == list(result.proportions.columns)
    assert PROPORTIONS_KEY in result.adata.obsm and QC_KEY in obs
    assert not any(c.startswith("deconv_") for c in slide.obs.columns)  # input untouched


def test_results_with_libraries_write_to_h5ad(two_samples, tmp_path):
    both, _, _, reference = two_samples
    result = deconvolve(both, reference, cell_type_key=KEY, library_key="sample", n_layers=20)
    result.adata.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert set(back.uns["stlnmf"]["libraries"]) == {"A", "B"}


@pytest.mark.parametrize(
    "change, options, message",
    [
        (lambda s: None, {"library_key": "no_such_column"}, "not a column of slide.obs"),
        (
            lambda s: s.obs.__setitem__("sample", [None] * 3 + ["A"] * (s.n_obs - 3)),
            {"library_key": "sample"},
            "missing for 3 spots",
        ),
        (lambda s: None, {"library_key": "sample", "library_id": "A"}, "not both"),
        (lambda s: s.obs.__setitem__("in_tissue", 0), {}, "no tissue"),
    ],
)
def test_bad_library_options_are_refused_with_the_fix(demo, change, options, message):
    slide, reference = demo
    slide = slide.copy()
    slide.obs["sample"] = "A"
    change(slide)
    with pytest.raises(StlnmfError, match=message):
        deconvolve(slide, reference, cell_type_key=KEY, **options)


def test_cli_fits_each_library_and_draws_its_maps_apart(two_samples, tmp_path, capsys):
    from napari_stlnmf.cli import main

    both, _, _, reference = two_samples
    both.write_h5ad(tmp_path / "atlas.h5ad")
    reference.write_h5ad(tmp_path / "reference.h5ad")
    argv = [
        "run",
        "--slide",
        str(tmp_path / "atlas.h5ad"),
        "--reference",
        str(tmp_path / "reference.h5ad"),
    ]
    argv += ["--cell-type-key", KEY, "--library-key", "sample", "--out", str(tmp_path / "out")]
    assert main(argv + ["--layers", "20"]) == 0
    printed = capsys.readouterr().out
    assert "library A:" in printed and "library B:" in printed
    assert list((tmp_path / "out" / "maps_A").glob("map_*.png"))
    assert list((tmp_path / "out" / "maps_B").glob("map_*.png"))
