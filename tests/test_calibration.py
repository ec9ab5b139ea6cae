"""The slide's self-measurements before the fit: platform effect, noise, cells per spot."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from napari_stlnmf.datasets import hex_layout
from napari_stlnmf.simulate import simulate_slide


def test_noise_estimate_sees_the_platform_effect(demo_reference):
    """The calibration of training noise measures a per-gene platform effect from a fit."""
    from napari_stlnmf.calibration import estimate_noise
    from napari_stlnmf.preprocess import prepare

    xy = hex_layout(20, 20)
    sigmas = []
    for platform in (0.0, 0.4):
        sim = simulate_slide(
            xy, demo_reference, library_sizes=np.full(10, 5000.0), platform_sigma=platform, seed=2
        )
        prep = prepare(sim.counts, demo_reference.genes, demo_reference)
        truth_mrna = sim.mrna_fractions * prep.gene_share[None, :]  # on the selected genes
        truth_mrna /= truth_mrna.sum(1, keepdims=True)
        sigmas.append(estimate_noise(prep.X, prep.library_size, prep.B, truth_mrna).platform_sigma)
    assert sigmas[0] < 0.1
    assert 0.25 < sigmas[1] < 0.6


def test_platform_effect_estimate_recovers_gene_factors(demo_reference):
    """Known per-gene factors applied to a simulated slide are recovered from its totals;
    without a platform effect the estimate stays near zero (nothing to correct)."""
    from napari_stlnmf.calibration import estimate_platform_effect
    from napari_stlnmf.preprocess import prepare, with_platform_effect

    rng = np.random.default_rng(3)
    xy = hex_layout(25, 25)
    sim = simulate_slide(xy, demo_reference, library_sizes=np.full(10, 5000.0), seed=4)
    prep0 = prepare(sim.counts, demo_reference.genes, demo_reference)
    genes = demo_reference.genes.get_indexer(prep0.genes)
    true_log = np.zeros(demo_reference.genes.size)
    true_log[genes] = rng.normal(scale=0.4, size=genes.size)
    shifted = rng.poisson(sim.counts * np.exp(true_log)[None, :]).astype(np.float32)
    for counts, expected in ((sim.counts, None), (shifted, true_log[genes])):
        prep = prepare(counts, demo_reference.genes, demo_reference, genes=list(prep0.genes))
        truth = sim.mrna_fractions * prep.gene_share[None, :]
        truth /= truth.sum(1, keepdims=True)
        est = estimate_platform_effect(prep.X, prep.library_size, prep.B, truth)
        if expected is None:
            assert np.std(est) < 0.1
        else:
            assert np.corrcoef(est, expected - np.median(expected))[0, 1] > 0.9
            corrected = with_platform_effect(prep, est)
            assert np.allclose(corrected.B.sum(0), 1.0, atol=1e-5)
            # the reference as this platform measures it
            target = prep.B * np.exp(expected)[:, None]
            target /= target.sum(0)
            pos = target > 0

            def err(b, target=target, pos=pos):
                return np.abs(np.log(b[pos] / target[pos])).mean()

            assert err(corrected.B) < 0.5 * err(prep.B)


def test_auto_threshold_follows_cells_per_spot():
    from napari_stlnmf.calibration import auto_min_proportion, effective_cells_per_spot

    assert auto_min_proportion(None) == 0.05  # not measurable: the safe floor
    assert auto_min_proportion(1.0) == 0.25 and auto_min_proportion(10.0) == 0.05
    assert auto_min_proportion(2.0) == 0.0625
    assert effective_cells_per_spot(0.5, 0.1) == 5.0
    assert effective_cells_per_spot(0.0, 0.1) is None and effective_cells_per_spot(0.5, 0.0) is None


def test_slide_noise_as_a_gamma_shape():
    from napari_stlnmf.calibration import SlideNoise

    assert SlideNoise(overdispersion=0.25).gamma_shape == 4.0
    assert SlideNoise().gamma_shape == float("inf")  # Poisson only


def test_calibrate_measures_what_the_options_need(demo, demo_reference):
    """One quick fit gives the noise and the cells per spot on raw counts; without anything
    that needs it nothing is measured and the inputs are returned as they were."""
    from napari_stlnmf.calibration import calibrate
    from napari_stlnmf.preprocess import prepare

    slide, _ = demo
    prep = prepare(slide.X, slide.var_names, demo_reference)
    plain = calibrate(
        prep,
        demo_reference,
        slide_counts=slide.X,
        gene_weighting="sqrt",
        min_proportion=0.1,
        platform_effect=False,
    )
    assert plain.prepared is prep and plain.noise is None and plain.log_platform_factor is None
    assert plain.min_proportion == 0.1 and plain.cells_per_spot is None
    auto = calibrate(
        prep,
        demo_reference,
        slide_counts=slide.X,
        gene_weighting="nb",
        min_proportion="auto",
        platform_effect=True,
    )
    assert auto.noise.overdispersion > 0 and auto.log_platform_factor.shape == (len(prep.genes),)
    assert 2 < auto.cells_per_spot < 10  # the demo's spots hold ~3-15 cells of unequal size
    assert auto.min_proportion == 0.05
    assert not np.allclose(auto.prepared.B, prep.B)  # corrected for the platform effect
    # normalised (non-integer) slide values: cells per spot is not measurable, threshold 0.05
    scaled = calibrate(
        prep,
        demo_reference,
        slide_counts=slide.X * 0.37,
        gene_weighting="sqrt",
        min_proportion="auto",
        platform_effect=False,
    )
    assert scaled.noise is None and scaled.cells_per_spot is None and scaled.min_proportion == 0.05


def test_depth_estimate_of_cells_per_spot():
    from napari_stlnmf.calibration import combined_cells_per_spot, depth_cells_per_spot

    content = np.array([100.0, 300.0])
    # spots of 4 cells: 2+2 (mRNA shares 0.25 / 0.75, 800 counts) and 4 of the first (400)
    V = np.array([[0.25, 0.75], [1.0, 0.0]])
    assert depth_cells_per_spot(np.array([800.0, 400.0]), V, content) == pytest.approx(4.0)
    assert depth_cells_per_spot(np.array([800.0]), V[:1], np.array([0.0, 1.0])) is None
    # the threshold rises only when both estimates say few cells; no noise estimate: None
    assert combined_cells_per_spot(1.2, 7.6) == 7.6 and combined_cells_per_spot(1.5, 0.3) == 1.5
    assert combined_cells_per_spot(2.0, None) == 2.0 and combined_cells_per_spot(None, 5.0) is None


def test_cells_sharing_a_state_do_not_raise_the_threshold(demo_reference):
    """Real spots: the cells of a spot share a state (or come from another field than the
    reference's), so the slide's residual holds variance the reference's cells do not and
    φ_cells / φ_slide reads far too few cells (seqFISH+ 1.2 for 10.6, docs/method.md). Spots of
    ten reference cells, each spot's genes scaled by its own state: the noise estimate says ~2
    cells, the depth (same platform) says ~10, and the threshold keeps its floor."""
    from napari_stlnmf.calibration import calibrate
    from napari_stlnmf.preprocess import prepare

    rng = np.random.default_rng(3)
    C, labels = demo_reference.cell_counts, demo_reference.cell_labels
    n_types = len(demo_reference.cell_types)
    spots = []
    for _ in range(300):
        main, other = rng.choice(n_types, 2, replace=False)
        types = np.where(rng.random(10) < 0.7, main, other)
        cells = [rng.choice(np.flatnonzero(labels == t)) for t in types]
        expected = np.asarray(C[cells].sum(0)).ravel()
        state = rng.lognormal(0.0, 0.6, size=expected.size)
        spots.append(rng.poisson(expected * state / state.mean()))
    counts = sp.csr_matrix(np.array(spots, dtype=np.float32))
    prep = prepare(counts, demo_reference.genes, demo_reference)
    cal = calibrate(
        prep,
        demo_reference,
        slide_counts=counts,
        gene_weighting="nb",
        min_proportion="auto",
        platform_effect=False,
    )
    assert cal.cells_per_spot_noise < 2, cal  # the noise model alone: ~1.5 cells, threshold 0.1
    assert 7 < cal.cells_per_spot_depth < 13, cal
    assert cal.cells_per_spot == cal.cells_per_spot_depth and cal.min_proportion == 0.05
