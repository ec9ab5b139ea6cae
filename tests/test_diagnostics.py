"""Missing-type diagnosis (issue 20, must-have 2): ``deconvolve(..., diagnose=True)`` on the
bundled demo slide with a cell type held out of its reference.

Measured with the code of this commit (spots "where the type lived": true cell fraction >= 0.1;
precision = flagged spots that are such spots, recall = such spots that are flagged):

| held out | spots | flagged | precision | recall |
|---|---|---|---|---|
| immune | 231 | 111 | 0.78 | 0.38 |
| astrocyte | 319 | 114 | 0.81 | 0.29 |
| neuron_L2 | 249 | 119 | 0.96 | 0.46 |
| oligodendrocyte | 353 | 74 | 0.92 | 0.19 |
| microglia | 192 | 126 | 0.89 | 0.58 |
| none (full reference) | - | 23 (2.8 %) | - | - |

Recall is bounded by the other types absorbing part of a missing type (a spot with 10-20 % of it
is explained nearly as well without it): its median deviance z rises with its true share.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_stlnmf.diagnostics import (
    deviance_moments,
    diagnosis_summary,
    nb_deviance,
    reference_marker_sets,
)
from napari_stlnmf.errors import StlnmfError

KEY = "cell_type"


@pytest.fixture(scope="module")
def marker_sets(demo_reference):
    """The demo types' top 30 markers, from the full reference: the held-out type's included."""
    return reference_marker_sets(demo_reference, 30)


def _held_out_run(demo, held_out, marker_sets):
    from napari_stlnmf import deconvolve

    slide, reference = demo
    kept = reference[reference.obs[KEY].astype(str) != held_out].copy()
    return deconvolve(
        slide, kept, cell_type_key=KEY, seed=0, diagnose=True, marker_gene_sets=marker_sets
    )


@pytest.mark.parametrize(
    ("phi", "mu"), [(0.0, 0.3), (0.0, 5.0), (0.1, 0.5), (0.1, 8.0), (0.3, 40.0)]
)
def test_deviance_moments_match_simulated_counts(phi, mu):
    """The exact mean and variance of an entry's deviance agree with NB draws."""
    rng = np.random.default_rng(0)
    if phi > 0:
        x = rng.negative_binomial(1 / phi, (1 / phi) / (1 / phi + mu), size=400_000)
    else:
        x = rng.poisson(mu, size=400_000)
    d = nb_deviance(x, np.full(x.shape, mu), phi)
    grid = np.array([mu])
    mean, var = deviance_moments(phi, grid)
    assert d.mean() == pytest.approx(mean[0], rel=0.02)
    assert d.var() == pytest.approx(var[0], rel=0.05)


@pytest.mark.parametrize(
    ("held_out", "min_precision", "min_recall"), [("immune", 0.7, 0.3), ("astrocyte", 0.7, 0.2)]
)
def test_held_out_type_is_flagged_where_it_lived(
    demo, marker_sets, held_out, min_precision, min_recall
):
    slide, _ = demo
    res = _held_out_run(demo, held_out, marker_sets)
    diag = res.diagnostics
    assert list(diag.index) == list(slide.obs_names)
    flagged = diag["poorly_explained"].to_numpy()
    lived = slide.obsm["true_proportions"][held_out].to_numpy() >= 0.1
    precision = (flagged & lived).sum() / flagged.sum()
    recall = (flagged & lived).sum() / lived.sum()
    assert precision >= min_precision
    assert recall >= min_recall
    # the flag follows the held-out type's share
    z = diag["deviance_z"].to_numpy()
    share = slide.obsm["true_proportions"][held_out].to_numpy()
    assert np.median(z[share >= 0.4]) > 3 > np.median(z[share < 0.01])
    # the largest region is named after the held-out type, from its markers
    regions = res.unexplained_regions
    assert len(regions) >= 1
    top = regions.iloc[0]
    assert top["population"] == held_out
    assert top["population_p"] < 1e-6
    genes = top["residual_genes"].split(";")
    assert len(set(genes) & set(marker_sets[held_out])) >= len(genes) // 2
    assert diag.loc[diag["region"] >= 0, "poorly_explained"].all()
    assert set(diag["region"][diag["region"] >= 0]) == set(regions["region"])
    info = res.info["diagnostics"]
    assert info["n_poorly_explained"] == int(flagged.sum())
    # the dock's summary: the share flagged, the largest region, its genes and population
    summary = diagnosis_summary(diag, regions)
    first, second = summary.split("\n")[:2]
    assert first.startswith(f"{flagged.mean():.1%} of spots ({int(flagged.sum())} of ")
    assert f"region {int(top['region'])} ({int(top['n_spots'])} spots)" in second
    assert ", ".join(genes[:5]) in second and f"markers of {held_out}" in second


def test_result_layers_show_the_misfit_and_reopen_with_it(demo, marker_sets):
    """The misfit z is a layer (above the fit error), on hover, and in a re-read result."""
    from napari_stlnmf.layers import (
        MISFIT_LAYER,
        MISFIT_MAX,
        hover_text,
        result_layer_name,
        result_layers,
        result_layers_from_adata,
    )

    slide, _ = demo
    res = _held_out_run(demo, "immune", marker_sets)
    layers = result_layers(
        res.proportions, res.fit_error, res.qc, slide, slide_name="demo",
        diagnostics=res.diagnostics,
    )  # fmt: skip
    names = [kw["name"] for _, kw, _ in layers]
    assert names[1] == result_layer_name("demo", MISFIT_LAYER) and len(names) == 4
    _, kwargs, kind = layers[1]
    assert kind == "points" and kwargs["face_color"] == "deviance_z"
    assert tuple(kwargs["face_contrast_limits"]) == (0.0, MISFIT_MAX)
    table = kwargs["metadata"]["stlnmf_table"]
    np.testing.assert_array_equal(table["deviance_z"], res.diagnostics["deviance_z"])
    i = int(np.flatnonzero(res.diagnostics["poorly_explained"].to_numpy())[0])
    text = hover_text(table, i)
    z = res.diagnostics["deviance_z"].iloc[i]
    assert text.splitlines()[-1] == f"misfit z  {z:.1f}  poorly explained"
    again = result_layers_from_adata(res.adata, slide_name="demo")
    assert [kw["name"] for _, kw, _ in again] == names
    np.testing.assert_allclose(
        again[1][1]["metadata"]["stlnmf_table"]["deviance_z"], table["deviance_z"]
    )
    # without diagnostics: the three layers, no misfit column
    plain = result_layers(res.proportions, res.fit_error, res.qc, slide, slide_name="demo")
    assert len(plain) == 3 and "deviance_z" not in plain[0][1]["metadata"]["stlnmf_table"]


def test_summary_of_a_full_reference_and_of_scattered_flags():
    per_spot = pd.DataFrame(
        {"deviance_z": [0.1, 0.5, -1.0, np.nan], "poorly_explained": [False] * 4}
    )
    assert diagnosis_summary(per_spot, pd.DataFrame()).startswith(
        "The reference explains every spot: none of 3 "
    )
    per_spot.loc[1, ["deviance_z", "poorly_explained"]] = [4.2, True]
    assert "scattered" in diagnosis_summary(per_spot, pd.DataFrame())


def test_full_reference_flags_few_spots_and_stores_the_columns(demo, tmp_path):
    """With nothing missing, few spots are flagged (2.8 % measured); the per-spot columns reach
    obs, and the CLI's writer adds them to spot_qc.csv beside unexplained_regions.csv."""
    import anndata as ad

    from napari_stlnmf import deconvolve
    from napari_stlnmf.cli import write_results

    slide, reference = demo
    res = deconvolve(slide, reference, cell_type_key=KEY, seed=0, diagnose=True)
    assert res.diagnostics["poorly_explained"].mean() < 0.05
    for column in ("deviance_z", "poorly_explained", "unexplained_region", "spot_deviance_z"):
        assert f"stlnmf_{column}" in res.adata.obs
    written = write_results(res, tmp_path / "out", plots=False)
    names = {p.name for p in written}
    assert {"spot_qc.csv", "unexplained_regions.csv"} <= names
    qc = pd.read_csv(tmp_path / "out" / "spot_qc.csv", index_col=0)
    assert list(qc.columns) == [
        "fit_error", "qc", "deviance_z", "poorly_explained", "region", "spot_deviance_z"
    ]  # fmt: skip
    np.testing.assert_allclose(qc["deviance_z"], res.diagnostics["deviance_z"])
    back = ad.read_h5ad(tmp_path / "out" / "result.h5ad")
    assert back.uns["stlnmf"]["diagnostics"]["n_genes"] > 0


def test_diagnose_off_by_default_leaves_the_result_as_before(demo):
    from napari_stlnmf import deconvolve

    slide, reference = demo
    res = deconvolve(slide, reference, cell_type_key=KEY, seed=0, n_layers=3)
    assert res.diagnostics is None and res.unexplained_regions is None
    assert "stlnmf_deviance_z" not in res.adata.obs
    assert "diagnostics" not in res.info


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"diagnose": "yes"}, "diagnose must be True or False"),
        ({"marker_gene_sets": ["PRSS1"]}, "mapping of population name"),
        ({"marker_gene_sets": {"acinar": "PRSS1"}}, r"marker_gene_sets\['acinar'\] must be a list"),
    ],
)
def test_bad_diagnostics_options_are_refused(demo, kwargs, match):
    from napari_stlnmf import deconvolve

    slide, reference = demo
    with pytest.raises(StlnmfError, match=match):
        deconvolve(slide, reference, cell_type_key=KEY, **kwargs)


def test_cli_diagnose_flag(tmp_path):
    from napari_stlnmf.cli import main
    from napari_stlnmf.datasets import DEMO_REFERENCE, DEMO_SLIDE

    out = tmp_path / "res"
    code = main(
        [
            "run", "--slide", str(DEMO_SLIDE), "--reference", str(DEMO_REFERENCE),
            "--cell-type-key", KEY, "--out", str(out), "--diagnose", "--quiet", "--layers", "3",
        ]
    )  # fmt: skip
    assert code == 0
    qc = pd.read_csv(out / "spot_qc.csv", index_col=0)
    assert {"deviance_z", "poorly_explained", "region"} <= set(qc.columns)
    assert (out / "unexplained_regions.csv").is_file()
