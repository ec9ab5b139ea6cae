"""The public steps of the pipeline, composed by hand, give what deconvolve gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stlnmf import deconvolve
from napari_stlnmf.calibration import calibrate
from napari_stlnmf.errors import StlnmfError
from napari_stlnmf.model import EntryNoise
from napari_stlnmf.pipeline import (
    DeconvolutionSettings,
    build_model,
    build_spot_graph,
    choose_gene_weighting,
    default_gene_weighting,
    finish,
    fit,
    load_reference,
    load_slide,
    make_solver,
    select_subtypes,
    shipped_refinement_model,
)
from napari_stlnmf.preprocess import prepare

KEY = "cell_type"


def test_steps_by_hand_reproduce_deconvolve(demo):
    slide, reference = demo
    settings = DeconvolutionSettings()
    adata = load_slide(slide)
    ref = load_reference(reference, KEY)
    weighting = default_gene_weighting(settings.method, settings.params, settings.train)
    prep = prepare(adata.X, adata.var_names, ref, gene_weighting=weighting)
    assert select_subtypes(prep, ref, settings) is None  # the demo's types are homogeneous
    weighting, compact = choose_gene_weighting(
        weighting, explicit=False, train=False, n_spots=prep.X.shape[0], n_types=prep.B.shape[1]
    )
    assert weighting == "nb" and not compact  # the shipped parameters use per-entry weights
    spots = build_spot_graph(adata, prep, settings)
    calibration = calibrate(
        prep,
        ref,
        slide_counts=adata.X,
        gene_weighting=weighting,
        min_proportion="auto",
        platform_effect=True,
        refine_with=shipped_refinement_model(prep),
    )
    prep = calibration.prepared
    noise = EntryNoise(torch.as_tensor(prep.library_size), calibration.noise.overdispersion)
    solver = make_solver(settings, build_model(prep, settings, entry_weights=True))
    solved = fit(prep, spots, solver, entry_noise=noise)
    fractions = finish(solved, prep, spots, solver, min_proportion=calibration.min_proportion)

    res = deconvolve(slide, reference, cell_type_key=KEY, seed=0)
    np.testing.assert_allclose(res.cell_fractions.to_numpy(), fractions.cell, atol=1e-7)
    np.testing.assert_allclose(res.mrna_fractions.to_numpy(), fractions.mrna, atol=1e-7)
    np.testing.assert_allclose(res.fit_error.to_numpy(), fractions.fit_error, rtol=1e-6)
    assert res.info["cells_per_spot"] == calibration.cells_per_spot


def test_settings_are_checked_once_up_front():
    with pytest.raises(StlnmfError, match="method must be"):
        DeconvolutionSettings(method="magic")
    with pytest.raises(StlnmfError, match="fractions must be"):
        DeconvolutionSettings(fractions="counts")
    with pytest.raises(StlnmfError, match="min_proportion"):
        DeconvolutionSettings(min_proportion=1.5)
    with pytest.raises(StlnmfError, match="needs method='unrolled'"):
        DeconvolutionSettings(method="classic", gene_weighting="nb")
    with pytest.raises(StlnmfError, match="cell_subtypes"):
        DeconvolutionSettings(cell_subtypes="sometimes")


def test_model_from_a_missing_parameter_file_is_an_error(demo, tmp_path):
    slide, reference = demo
    prep = prepare(slide.X, slide.var_names, load_reference(reference, KEY))
    settings = DeconvolutionSettings(params=tmp_path / "nope.pt")
    with pytest.raises(StlnmfError, match="does not exist"):
        build_model(prep, settings, entry_weights=False)


def test_gene_weighting_choice_follows_the_memory_limit():
    """Per-spot Gram matrices go compact past the float32 limit; past the compact limit the
    default falls back to per-gene weights with a warning, an explicit 'nb' is an error."""
    from napari_stlnmf.model import gram_bytes

    n, p = 10_000, 20
    roomy = choose_gene_weighting("nb", explicit=False, train=False, n_spots=n, n_types=p)
    assert roomy == ("nb", False)
    between = (gram_bytes(n, p) + gram_bytes(n, p, compact=True)) // 2
    kw = {"explicit": False, "train": False, "n_spots": n, "n_types": p}
    assert choose_gene_weighting("nb", max_gram_bytes=between, **kw) == ("nb", True)
    with pytest.warns(RuntimeWarning, match="per-entry weights need"):
        assert choose_gene_weighting("nb", max_gram_bytes=1024, **kw)[0] == "sqrt"
    with pytest.warns(RuntimeWarning):
        trained = choose_gene_weighting("nb", max_gram_bytes=1024, **{**kw, "train": True})
    assert trained[0] == "fitted"
    with pytest.raises(StlnmfError, match="fewer cell types"):
        choose_gene_weighting("nb", max_gram_bytes=1024, **{**kw, "explicit": True})
    assert choose_gene_weighting("sqrt", max_gram_bytes=1024, **kw)[0] == "sqrt"


def _states_slide(n_states=12, n_types=4):
    """Types made of states whose mix changes across the slide, the reference labelling only
    the types (as the suite's states slide; osmFISH's pyramidal classes)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from napari_stlnmf.datasets import hex_layout, make_reference
    from napari_stlnmf.preprocess import build_reference
    from napari_stlnmf.simulate import simulate_slide

    coarse = lambda names: [f"type_{int(str(n).split('_')[1]) % n_types}" for n in names]
    reference = make_reference(n_types=n_states, cells_per_type=120, seed=38)
    reference.obs[KEY] = pd.Categorical(coarse(reference.obs[KEY]))
    cells = build_reference(
        make_reference(n_types=n_states, cells_per_type=120, seed=38, cell_seed=39),
        cell_type_key=KEY,
    )
    xy = hex_layout(14, 14)
    sim = simulate_slide(xy, cells, kind="smooth", library_sizes=np.array([3000.0]), seed=5)
    slide = ad.AnnData(X=sp.csr_matrix(sim.counts), var=pd.DataFrame(index=cells.genes))
    slide.obsm["spatial"] = xy
    types = sorted(set(coarse(cells.cell_types)))
    fold = np.eye(n_types)[[types.index(t) for t in coarse(cells.cell_types)]]
    return slide, reference, sim.cell_fractions @ fold, types


def test_sub_profiles_where_the_types_are_states():
    """The slide's held-out genes choose sub-profiles when the reference's types are mixes of
    states; the output keeps the reference's types and is much closer to the truth."""
    from napari_stlnmf.api import run_deconvolution
    from napari_stlnmf.metrics import rmse

    slide, reference, truth, types = _states_slide()
    auto = run_deconvolution(slide, reference, DeconvolutionSettings(), cell_type_key=KEY)
    plain = run_deconvolution(
        slide, reference, DeconvolutionSettings(cell_subtypes=False), cell_type_key=KEY
    )
    info = auto.info["cell_subtypes"]
    assert info is not None and info["n_profiles"] > len(types) and info["deviance_ratio"] < 1
    assert plain.info["cell_subtypes"] is None
    assert list(auto.cell_fractions.columns) == types == auto.info["cell_types"]
    np.testing.assert_allclose(auto.cell_fractions.sum(1), 1.0, atol=1e-6)
    err_auto = rmse(auto.cell_fractions[types].to_numpy(), truth)
    err_plain = rmse(plain.cell_fractions[types].to_numpy(), truth)
    assert err_auto < 0.8 * err_plain, (err_auto, err_plain)


def test_a_reference_reused_across_slides_keeps_its_sub_profile_splits():
    """A built reference passed to several slides (a batch, a loop) splits its types once per
    gene set and seed, and every slide's answer is the one a freshly built reference gives; a
    pickled reference (what a dask scatter sends) carries none of it."""
    import pickle

    from napari_stlnmf.pipeline import load_reference

    slide, reference, _, _ = _states_slide()
    fresh = lambda: load_reference(reference, KEY, max_cells_per_type=10_000)
    kept = fresh()
    first = deconvolve(slide, kept, cell_type_key=KEY)
    assert first.info["cell_subtypes"] is not None  # the splits are used, not only tested
    assert len(kept._memo) == 1
    splits = next(iter(kept._memo.values()))
    again = deconvolve(slide, kept, cell_type_key=KEY)
    assert next(iter(kept._memo.values())) is splits  # reused, not recomputed
    baseline = deconvolve(slide, fresh(), cell_type_key=KEY)
    for result in (first, again):
        np.testing.assert_array_equal(result.proportions, baseline.proportions)
    deconvolve(slide, kept, cell_type_key=KEY, seed=1)
    assert len(kept._memo) == 2  # another seed, other splits
    assert pickle.loads(pickle.dumps(kept))._memo == {}


def test_sub_profiles_sum_back_into_their_types(demo_reference):
    from napari_stlnmf.subtypes import SUBTYPE_MARK, merge_subtypes, split_cell_types

    split, parent = split_cell_types(demo_reference, demo_reference.genes, max_per_type=3)
    assert len(split.cell_types) == 3 * len(demo_reference.cell_types)  # 250 cells per type
    assert all(SUBTYPE_MARK in t for t in split.cell_types)
    assert [demo_reference.cell_types[i] for i in parent] == [
        t.split(SUBTYPE_MARK)[0] for t in split.cell_types
    ]
    np.testing.assert_allclose(split.profiles.sum(0), 1.0)
    values = np.random.default_rng(0).dirichlet(np.ones(parent.size), size=5)
    merged = merge_subtypes(values, parent, len(demo_reference.cell_types))
    np.testing.assert_allclose(merged.sum(1), 1.0)
    np.testing.assert_allclose(merged[:, 0], values[:, parent == 0].sum(1))
    # mRNA per cell: half its own cells', half its type's (geometric mean)
    counts = demo_reference.cell_counts
    lib = np.asarray(counts.sum(1)).ravel()
    for j, name in enumerate(split.cell_types):
        own = lib[split.cell_labels == j].mean()
        whole = demo_reference.mrna_content[demo_reference.cell_types[parent[j]]]
        assert split.mrna_content[name] == pytest.approx(np.sqrt(own * whole))


def test_platform_effect_not_fitted_on_panels_too_small_to_tell_it_from_composition(demo):
    from napari_stlnmf.calibration import MIN_GENES_PER_PROFILE_FOR_PLATFORM

    slide, reference = demo
    n_types = reference.obs[KEY].nunique()
    full = deconvolve(slide, reference, cell_type_key=KEY)
    assert full.info["platform_effect_fitted"]
    panel = list(full.info["genes"][: MIN_GENES_PER_PROFILE_FOR_PLATFORM * n_types - 1])
    small = deconvolve(slide[:, panel].copy(), reference[:, panel].copy(), cell_type_key=KEY)
    assert not small.info["platform_effect_fitted"]
    assert small.info["n_genes_used"] < MIN_GENES_PER_PROFILE_FOR_PLATFORM * n_types
