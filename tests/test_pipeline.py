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
