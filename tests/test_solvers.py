"""The classic and unrolled solvers behind one interface give what the pipeline computes."""

import numpy as np
import pytest
import torch

from napari_stlnmf import api, deconvolve
from napari_stlnmf.model import UnrolledNMF
from napari_stlnmf.solvers import ClassicSolver, FitInputs, UnrolledSolver

KEY = "cell_type"


def _recording(monkeypatch, module, name, calls):
    """Wrap ``module.name`` so that its arguments and result are appended to ``calls``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(module, name, wrapper)


def test_classic_solver_gives_the_pipelines_classic_fit(demo, monkeypatch):
    """What ``deconvolve(method='classic')`` prepares, fed to :class:`ClassicSolver`, gives the
    same V, normal equations and parameters."""
    prepared, graphs, solved = [], [], []
    _recording(monkeypatch, api, "prepare", prepared)
    _recording(monkeypatch, api, "build_graph", graphs)
    _recording(monkeypatch, api, "solve", solved)
    slide, reference = demo
    res = deconvolve(slide, reference, cell_type_key=KEY, method="classic", seed=0)
    prep, graph = prepared[-1][2], graphs[-1][2]
    (BtX, BtB), _, V = solved[-1]
    inputs = FitInputs(prep.X, torch.as_tensor(prep.B), torch.as_tensor(prep.gene_scale), graph)
    steps = []
    solver = ClassicSolver()
    fit = solver.run(inputs, callback=lambda i, n: steps.append(i))
    assert torch.equal(fit.V, V)
    assert torch.equal(fit.BtX, BtX) and torch.equal(fit.BtB, BtB)
    assert torch.equal(fit.gene_scale, inputs.gene_scale)
    assert steps and steps[-1] <= solver.max_iter
    assert solver.describe() == res.info["params"]
    np.testing.assert_allclose(
        solver.cell_fractions(V.numpy(), prep.mrna_content, graph),
        api.to_cell_fractions(V.numpy(), prep.mrna_content),
    )


def test_unrolled_solver_gives_the_pipelines_inference(demo, monkeypatch):
    """The default run's final inference (per-entry weights, the shipped parameters), repeated
    through :class:`UnrolledSolver` with the same inputs, gives the same V."""
    calls = []
    _recording(monkeypatch, UnrolledNMF, "infer", calls)
    slide, reference = demo
    res = deconvolve(slide, reference, cell_type_key=KEY, seed=0)
    args, kwargs, V = next(c for c in reversed(calls) if c[1].get("callback") is not None)
    model, X, B, scale, graph = args
    assert model.entry_weights and kwargs["noise"] is not None
    inputs = FitInputs(X, B, scale, graph, kwargs["noise"])
    monkeypatch.undo()
    solver = UnrolledSolver(model)
    fit = solver.run(inputs)
    assert torch.equal(fit.V, V)
    BtX, BtB = model.gram(X, B, scale)
    assert torch.equal(fit.BtX, BtX.detach()) and torch.equal(fit.BtB, BtB.detach())
    torch.testing.assert_close(fit.gene_scale, scale * model.gene_weights().detach())
    assert solver.describe() == res.info["params"]


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
    B, g = torch.as_tensor(prep.B), torch.as_tensor(prep.gene_scale)
    model = UnrolledNMF(*prep.B.shape, n_layers=25, omega=1.4)
    noise = None
    if entry:
        model.refresh_layers = (0, 10)
        noise = EntryNoise(torch.as_tensor(prep.library_size), 0.1)
    graph = build_graph(xy)
    fit = UnrolledSolver(model).run(FitInputs(prep.X, B, g, graph, noise))
    assert torch.equal(fit.V, model.infer(prep.X, B, g, graph, noise=noise))
