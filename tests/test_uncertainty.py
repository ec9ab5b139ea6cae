"""Uncertainty intervals (issue 20, must-have 1): ``deconvolve(..., uncertainty=True)`` on the
bundled demo and on slides simulated from disjoint halves of a reference's cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stlnmf import deconvolve
from napari_stlnmf.errors import StlnmfError
from napari_stlnmf.uncertainty import interval_from_draws

KEY = "cell_type"
LEVEL = 0.9


def _simulated(depth: float, seed: int, kind: str = "smooth", n_types: int = 6):
    """A 400-spot hexagonal slide whose cells are the other half of the reference's types'."""
    from napari_stlnmf.datasets import hex_layout, make_reference
    from napari_stlnmf.preprocess import build_reference
    from napari_stlnmf.simulate import simulate_slide

    full = make_reference(n_types=n_types, n_genes=600, cells_per_type=120, seed=seed)
    rng = np.random.default_rng(seed)
    half = np.zeros(full.n_obs, dtype=bool)
    for t in pd.unique(full.obs[KEY]):
        idx = np.flatnonzero((full.obs[KEY] == t).to_numpy())
        half[rng.permutation(idx)[: idx.size // 2]] = True
    reference, cells = full[half].copy(), full[~half].copy()
    xy = hex_layout(20, 20)
    sim = simulate_slide(
        xy,
        build_reference(cells, cell_type_key=KEY),
        kind=kind,
        library_sizes=np.full(10, float(depth)),
        seed=1000 + seed,
    )
    slide = ad.AnnData(
        X=sp.csr_matrix(sim.counts),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=full.var_names),
    )
    slide.obsm["spatial"] = xy
    types = build_reference(cells, cell_type_key=KEY).cell_types
    return slide, reference, pd.DataFrame(sim.cell_fractions, index=slide.obs_names, columns=types)


def _run(slide, reference, seed=0, **kw):
    kw.setdefault("uncertainty_draws", 20)
    return deconvolve(slide, reference, cell_type_key=KEY, seed=seed, uncertainty=True, **kw)


@pytest.fixture(scope="module")
def demo_run(demo):
    slide, reference = demo
    return _run(slide, reference)


def test_intervals_contain_the_estimate_and_are_stored(demo_run):
    res = demo_run
    unc = res.uncertainty
    lo, hi, p = unc.lower.to_numpy(), unc.upper.to_numpy(), res.proportions.to_numpy()
    assert unc.lower.index.equals(res.proportions.index)
    assert list(unc.upper.columns) == list(res.proportions.columns)
    ok = ~np.isnan(p)
    assert np.array_equal(ok, ~np.isnan(lo)) and np.array_equal(ok, ~np.isnan(hi))
    assert np.all(lo[ok] <= p[ok]) and np.all(p[ok] <= hi[ok])
    assert np.all(lo[ok] >= 0) and np.all(hi[ok] <= 1)
    # not degenerate: the dominant type of a spot has an interval of some width
    dominant = p[ok.all(1)].argmax(1)
    width = (hi - lo)[ok.all(1)][np.arange(dominant.size), dominant]
    assert np.median(width) > 0.005
    assert unc.level == LEVEL and unc.n_draws == 20
    assert res.info["uncertainty"]["n_draws"] == 20
    np.testing.assert_array_equal(res.adata.obsm["stlnmf_lower"].to_numpy(), lo)
    np.testing.assert_array_equal(res.adata.obsm["stlnmf_upper"].to_numpy(), hi)


def test_same_seed_same_intervals(demo, demo_run):
    slide, reference = demo
    again = _run(slide, reference)
    pd.testing.assert_frame_equal(again.uncertainty.lower, demo_run.uncertainty.lower)
    pd.testing.assert_frame_equal(again.uncertainty.upper, demo_run.uncertainty.upper)
    other = _run(slide, reference, seed=1)
    assert not np.allclose(
        other.uncertainty.upper.to_numpy(), demo_run.uncertainty.upper.to_numpy()
    )


def test_mrna_fractions_get_their_own_intervals(demo, demo_run):
    """``fractions='mrna'``: intervals of the mRNA fractions (their own, smaller model error),
    containing them."""
    from napari_stlnmf.uncertainty import MODEL_SD

    slide, reference = demo
    res = _run(slide, reference, fractions="mrna", uncertainty_draws=5)
    p = res.proportions.to_numpy()
    np.testing.assert_array_equal(p, res.mrna_fractions.to_numpy())
    assert (res.uncertainty.lower.to_numpy() <= p).all()
    assert (p <= res.uncertainty.upper.to_numpy()).all()
    assert res.info["uncertainty"]["model_sd"] == MODEL_SD["mrna"] < MODEL_SD["cell"]
    assert demo_run.info["uncertainty"]["model_sd"] == MODEL_SD["cell"]


def test_intervals_without_uncertainty_are_none(demo):
    slide, reference = demo
    res = deconvolve(slide, reference, cell_type_key=KEY, seed=0)
    assert res.uncertainty is None and "stlnmf_lower" not in res.adata.obsm


def test_deeper_counts_give_narrower_intervals():
    """The same tissue (proportions and cells: same seed) at 10x the depth: narrower."""
    widths = {}
    for depth in (500, 5000):
        slide, reference, truth = _simulated(depth, seed=3)
        unc = _run(slide, reference).uncertainty
        widths[depth] = float(np.mean((unc.upper - unc.lower).to_numpy()[truth.to_numpy() > 0]))
    assert widths[5000] < 0.9 * widths[500], widths


def test_coverage_on_a_simulation_within_band():
    """Stated 90 %: the share of true cell fractions inside the intervals, over the entries where
    the type is present in the truth or the estimate, lies within 0.82-0.96 on a simulation whose
    seed and kind were not used for the calibration (MODEL_SD)."""
    slide, reference, truth = _simulated(2000, seed=21, kind="gradient")
    res = _run(slide, reference, uncertainty_draws=30)
    unc = res.uncertainty
    t = truth[unc.lower.columns].to_numpy()
    p = res.proportions.to_numpy()
    inside = (unc.lower.to_numpy() <= t + 1e-9) & (t <= unc.upper.to_numpy() + 1e-9)
    present = (t > 0) | (p > 0)
    assert 0.82 <= inside[present].mean() <= 0.96, inside[present].mean()


def test_interval_from_draws_is_centred_on_the_estimate():
    rng = np.random.default_rng(0)
    draws = 0.3 + 0.05 * rng.standard_normal((400, 1, 1))  # median ~0.3, sd 0.05
    point = np.array([[0.5]])
    lo, hi = interval_from_draws(point, draws, 0.9, model_sd=0.0)
    assert lo[0, 0] == pytest.approx(0.5 - 1.645 * 0.05, abs=0.015)
    assert hi[0, 0] == pytest.approx(0.5 + 1.645 * 0.05, abs=0.015)
    # the model error adds in quadrature: sqrt(0.05^2 + 0.05^2) = 0.0707 sd
    lo2, hi2 = interval_from_draws(point, draws, 0.9, model_sd=0.05)
    assert hi2[0, 0] - lo2[0, 0] == pytest.approx(2 * 1.645 * 0.0707, abs=0.03)
    # a reported zero stays inside, its upper end set by the model error
    lo3, hi3 = interval_from_draws(np.array([[0.0]]), np.zeros((30, 1, 1)), 0.9, model_sd=0.05)
    assert lo3[0, 0] == 0.0 and hi3[0, 0] == pytest.approx(1.645 * 0.05, rel=1e-3)


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("uncertainty_draws", 0, "uncertainty_draws"),
        ("uncertainty_draws", -5, "uncertainty_draws"),
        ("uncertainty_draws", 1, "uncertainty_draws"),
        ("uncertainty_draws", 2.5, "uncertainty_draws"),
        ("uncertainty_draws", True, "uncertainty_draws"),
        ("uncertainty_level", 0.0, "between 0 and 1"),
        ("uncertainty_level", 1.0, "between 0 and 1"),
        ("uncertainty_level", 90, "between 0 and 1"),
        ("uncertainty_level", float("nan"), "between 0 and 1"),
        ("uncertainty_level", "0.9", "between 0 and 1"),
        ("uncertainty", "yes", "True or False"),
    ],
)
def test_bad_options_are_refused(demo, option, value, needle):
    slide, reference = demo
    kw = {"uncertainty": True, option: value}
    with pytest.raises(StlnmfError, match=needle):
        deconvolve(slide, reference, cell_type_key=KEY, **kw)


def test_cli_uncertainty_flag(tmp_path):
    """``--uncertainty`` writes the two tables by barcode; they bound proportions.csv and are
    listed in the run's manifest (so --overwrite removes them)."""
    import json

    from napari_stlnmf.cli import main
    from napari_stlnmf.datasets import DEMO_REFERENCE, DEMO_SLIDE

    out = tmp_path / "res"
    code = main(
        [
            "run", "--slide", str(DEMO_SLIDE), "--reference", str(DEMO_REFERENCE),
            "--cell-type-key", KEY, "--out", str(out), "--uncertainty",
            "--uncertainty-draws", "5", "--uncertainty-level", "0.8", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    p = pd.read_csv(out / "proportions.csv", index_col=0)
    lo = pd.read_csv(out / "proportions_lower.csv", index_col=0)
    hi = pd.read_csv(out / "proportions_upper.csv", index_col=0)
    assert lo.index.equals(p.index) and list(hi.columns) == list(p.columns)
    assert (lo.to_numpy() <= p.to_numpy() + 1e-12).all()
    assert (p.to_numpy() <= hi.to_numpy() + 1e-12).all()
    files = json.loads((out / "stlnmf_run.json").read_text())["files"]
    assert {"proportions_lower.csv", "proportions_upper.csv"} <= set(files)
    written = ad.read_h5ad(out / "result.h5ad")
    np.testing.assert_allclose(written.obsm["stlnmf_upper"].to_numpy(), hi.to_numpy())


def test_cli_bad_uncertainty_level_is_one_error_line(tmp_path, capsys):
    from napari_stlnmf.cli import main
    from napari_stlnmf.datasets import DEMO_REFERENCE, DEMO_SLIDE

    code = main(
        [
            "run", "--slide", str(DEMO_SLIDE), "--reference", str(DEMO_REFERENCE),
            "--cell-type-key", KEY, "--out", str(tmp_path / "r"), "--uncertainty",
            "--uncertainty-level", "90", "--quiet",
        ]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "uncertainty_level" in err and "Traceback" not in err


def test_each_library_gets_the_intervals_it_gets_alone(demo):
    """Two copies of the demo as two libraries: each library's intervals are the ones the
    slide gets alone (same seed; no image, which the concatenation drops)."""
    slide, reference = demo
    a, b = slide.copy(), slide.copy()
    a.obs_names = [f"a_{n}" for n in slide.obs_names]
    b.obs_names = [f"b_{n}" for n in slide.obs_names]
    a.obs["sample"], b.obs["sample"] = "a", "b"
    both = ad.concat([a, b])
    both.obsm["spatial"] = np.vstack([slide.obsm["spatial"]] * 2)
    res = _run(both, reference, library_key="sample", uncertainty_draws=5, use_image=False)
    alone = _run(slide, reference, uncertainty_draws=5, use_image=False)
    assert "uncertainty" in res.info["libraries"]["a"]
    for prefix in ("a_", "b_"):
        rows = res.uncertainty.upper.index.str.startswith(prefix)
        np.testing.assert_allclose(
            res.uncertainty.upper[rows].to_numpy(), alone.uncertainty.upper.to_numpy(), atol=1e-6
        )


def test_result_layers_carry_the_intervals_to_the_hover_and_back_from_h5ad(
    demo_run, demo, tmp_path
):
    """napari: one intervals object in every result layer; the hover shows each type's interval
    (the table's values, rounded); a written result .h5ad opens with them again."""
    from napari_stlnmf.layers import (
        INTERVALS_KEY,
        hover_text,
        result_layers,
        result_layers_from_adata,
    )

    slide, _ = demo
    res = demo_run
    layers = result_layers(
        res.proportions, res.fit_error, res.qc, slide, uncertainty=res.uncertainty
    )
    intervals = {id(kw["metadata"][INTERVALS_KEY]) for _, kw, _ in layers}
    assert len(intervals) == 1
    meta = layers[-1][1]["metadata"]
    k = 7
    text = hover_text(meta["stlnmf_table"], k, intervals=meta[INTERVALS_KEY])
    row = res.proportions.iloc[k]
    best = row[row >= 0.01].sort_values(ascending=False).index[:5]
    lines = text.split("\n")
    for t, line in zip(best, lines[1:], strict=False):
        lo, hi = res.uncertainty.lower.iloc[k][t], res.uncertainty.upper.iloc[k][t]
        assert line == f"{t}  {row[t]:.1%}  ({lo:.0%}–{hi:.0%})"
    assert f"intervals: {res.uncertainty.level:.0%}" in lines
    # without intervals the hover is as before
    assert "(" not in hover_text(meta["stlnmf_table"], k).split("\n")[1]
    path = tmp_path / "result.h5ad"
    res.adata.write_h5ad(path)
    again = result_layers_from_adata(ad.read_h5ad(path))
    back = again[-1][1]["metadata"][INTERVALS_KEY]
    np.testing.assert_allclose(back.lower, res.uncertainty.lower.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(back.upper, res.uncertainty.upper.to_numpy(), rtol=1e-6)
    assert back.level == res.uncertainty.level
