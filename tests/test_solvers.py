"""The classic and unrolled solvers behind one interface give what the pipeline computes."""

import numpy as np
import pytest
import torch

from napari_stlnmf import deconvolve
from napari_stlnmf.model import UnrolledNMF, to_cell_fractions
from napari_stlnmf.solvers import ClassicSolver, FitInputs, UnrolledSolver

KEY = "cell_type"


def test_classic_solver_gives_deconvolve_classic(demo):
    """The public steps with :class:`ClassicSolver` give ``deconvolve(method='classic')``."""
    from napari_stlnmf.calibration import calibrate
    from napari_stlnmf.pipeline import (
        DeconvolutionSettings,
        build_spot_graph,
        finish,
        fit,
        load_reference,
    )
    from napari_stlnmf.preprocess import prepare

    slide, reference = demo
    res = deconvolve(slide, reference, cell_type_key=KEY, method="classic", seed=0)
    settings = DeconvolutionSettings(method="classic")
    ref = load_reference(reference, KEY)
    prep = prepare(slide.X, slide.var_names, ref, gene_weighting="sqrt")
    spots = build_spot_graph(slide, prep, settings)
    calibration = calibrate(
        prep,
        ref,
        slide_counts=slide.X,
        gene_weighting="sqrt",
        min_proportion="auto",
        platform_effect=False,
    )
    steps = []
    solver = ClassicSolver()
    solved = fit(calibration.prepared, spots, solver, progress=lambda s, i, n: steps.append(i))
    out = finish(
        solved, calibration.prepared, spots, solver, min_proportion=calibration.min_proportion
    )
    np.testing.assert_array_equal(out.cell, res.cell_fractions.to_numpy())
    np.testing.assert_array_equal(out.mrna, res.mrna_fractions.to_numpy())
    assert steps and steps[-1] <= solver.max_iter == solver.n_layers
    assert solver.describe() == res.info["params"]
    np.testing.assert_allclose(
        solver.cell_fractions(solved.V.numpy(), prep.mrna_content, spots.graph),
        to_cell_fractions(solved.V.numpy(), prep.mrna_content),
    )


@pytest.mark.parametrize("entry", [False, True])
def test_unrolled_solver_is_the_models_inference(demo, demo_reference, entry):
    from napari_stlnmf.datasets import hex_layout
    from napari_stlnmf.graph import build_graph
    from napari_stlnmf.preprocess import prepare
    from napari_stlnmf.simulate import simulate_slide
    from napari_stlnmf.updates import EntryNoise

    xy = hex_layout(8, 9)
    sim = simulate_slide(xy, demo_reference, kind="regions", seed=2)
    prep = prepare(sim.counts, demo_reference.genes, demo_reference)
    B, g = torch.as_tensor(prep.B), torch.as_tensor(prep.gene_weights)
    model = UnrolledNMF(*prep.B.shape, n_layers=25, omega=1.4)
    noise = None
    if entry:
        model.refresh_layers = (0, 10)
        noise = EntryNoise(torch.as_tensor(prep.library_size), 0.1)
    graph = build_graph(xy)
    fit = UnrolledSolver(model).run(FitInputs(prep.X, B, g, graph, noise))
    assert torch.equal(fit.V, model.infer(prep.X, B, g, graph, noise=noise))
