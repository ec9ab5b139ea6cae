"""Simulated slides: valid, smooth, sparse proportions and realistic counts."""

import numpy as np
import pytest

from napari_stlnmf.datasets import hex_layout
from napari_stlnmf.graph import build_graph
from napari_stlnmf.simulate import KINDS, simulate_proportions, simulate_slide


@pytest.mark.parametrize("kind", KINDS)
def test_proportions_are_valid_sparse_and_smooth(kind):
    xy = hex_layout(25, 25)
    prob = simulate_proportions(xy, 8, kind=kind, rng=0)
    assert prob.shape == (len(xy), 8)
    assert (prob >= 0).all()
    np.testing.assert_allclose(prob.sum(1), 1.0)
    n_types = (prob > 0).sum(1)
    assert n_types.min() >= 1 and n_types.max() <= 6
    # spatially smooth: neighbours differ much less than random pairs
    g = build_graph(xy)
    neighbour = np.abs(prob[g.rows] - prob[g.cols]).sum(1).mean()
    perm = np.random.default_rng(0).permutation(len(xy))
    random_pairs = np.abs(prob - prob[perm]).sum(1).mean()
    assert neighbour < 0.6 * random_pairs


def test_slide_counts_and_truth(demo_reference):
    xy = hex_layout(12, 12)
    lib = np.full(50, 3000.0)
    sim = simulate_slide(
        xy, demo_reference, kind="smooth", library_sizes=lib, platform_sigma=0.3, seed=1
    )
    assert sim.counts.shape == (len(xy), len(demo_reference.genes))
    assert (sim.counts >= 0).all() and np.allclose(sim.counts, np.round(sim.counts))
    np.testing.assert_allclose(sim.cell_fractions.sum(1), 1.0)
    np.testing.assert_allclose(sim.mrna_fractions.sum(1), 1.0)
    assert np.median(sim.counts.sum(1)) == pytest.approx(3000, rel=0.15)
    # realised cell fractions are multiples of 1/n_cells
    np.testing.assert_allclose(
        sim.cell_fractions * sim.n_cells[:, None],
        np.round(sim.cell_fractions * sim.n_cells[:, None]),
        atol=1e-9,
    )


def test_simulation_is_seeded(demo_reference):
    xy = hex_layout(8, 8)
    a = simulate_slide(xy, demo_reference, seed=5)
    b = simulate_slide(xy, demo_reference, seed=5)
    c = simulate_slide(xy, demo_reference, seed=6)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, c.counts)


def test_signature_only_reference_simulates(demo_reference):
    from napari_stlnmf.preprocess import build_reference

    sig = build_reference(demo_reference.profiles * demo_reference.mrna_content.to_numpy())
    assert sig.cell_counts is None
    sim = simulate_slide(hex_layout(6, 6), sig, seed=0)
    assert sim.counts.sum() > 0


def test_near_pure_spots_hold_one_or_two_types_in_few_regions():
    xy = hex_layout(22, 22)
    for seed in range(3):
        prob = simulate_proportions(xy, 10, kind="near_pure", rng=seed)
        n_types = (prob > 0).sum(1)
        assert n_types.min() == 1 and n_types.max() == 2
        assert 3 <= len(np.unique(prob.argmax(1))) <= 6
        np.testing.assert_allclose(prob.sum(1), 1.0)
