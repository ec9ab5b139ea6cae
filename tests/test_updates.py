"""The shared update layer: in place == out of place for every data term, gradients through the
compact Gram layout, training with it, and tensors created on the inputs' device."""

import numpy as np
import pytest
import torch

from napari_stlnmf.datasets import hex_layout
from napari_stlnmf.errors import StlnmfError
from napari_stlnmf.graph import build_graph
from napari_stlnmf.model import UnrolledNMF, pick_device
from napari_stlnmf.preprocess import prepare
from napari_stlnmf.simulate import simulate_slide
from napari_stlnmf.solvers import ClassicSolver, FitInputs, UnrolledSolver
from napari_stlnmf.train import make_training_slides, train_unrolled
from napari_stlnmf.updates import (
    EntryNoise,
    LayerTerms,
    LearnedGraph,
    PerSpotGram,
    SharedGram,
    Workspace,
    entry_weighted_gram,
    gram_times,
    graph_tensors,
    inference_graph,
    update_layer,
)


@pytest.fixture(scope="module")
def slide(demo_reference):
    xy = hex_layout(7, 8)
    graph = build_graph(xy, features=np.random.default_rng(1).normal(size=(len(xy), 3)))
    sim = simulate_slide(xy, demo_reference, kind="regions", seed=5)
    prep = prepare(sim.counts, demo_reference.genes, demo_reference)
    return {
        "xy": xy,
        "graph": graph,
        "prep": prep,
        "X": torch.as_tensor(prep.X.toarray()),
        "B": torch.as_tensor(prep.B),
        "g": torch.as_tensor(prep.gene_weights),
        "noise": EntryNoise(torch.as_tensor(prep.library_size), 0.2),
        "compact": EntryNoise(torch.as_tensor(prep.library_size), 0.2, compact_gram=True),
    }


def _data_terms(slide):
    prep, B = slide["prep"], slide["B"]
    Bw = B * slide["g"][:, None] ** 2
    V = torch.rand(prep.X.shape[0], B.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1
    return V, {
        "shared": SharedGram(slide["X"] @ Bw, B.T @ Bw),
        "per-spot": PerSpotGram(*entry_weighted_gram(prep.X, B, V, slide["noise"])),
        "compact": PerSpotGram(*entry_weighted_gram(prep.X, B, V, slide["compact"])),
    }


@pytest.mark.parametrize("omega", [1.0, 1.6])
@pytest.mark.parametrize("kernel", ["scipy", "torch"])
def test_in_place_layer_is_the_differentiable_layer(slide, omega, kernel):
    """The same step in preallocated buffers with a fixed graph (scipy's or torch's kernel) and
    out of place with the training path's graph, for one Gram matrix and both per-spot layouts."""
    graph = slide["graph"]
    fixed = inference_graph(graph.adjacency(1.0, 1.0), "cpu", torch.float32, kernel=kernel)
    learned = LearnedGraph(graph_tensors(graph), 1.0, 1.0)
    torch.testing.assert_close(fixed.degree, learned.degree)
    V0, terms_of = _data_terms(slide)
    ridge = torch.full((V0.shape[1],), 0.02)
    for name, data in terms_of.items():
        V_ref, V = V0.clone(), V0.clone()
        workspace = Workspace.like(V)
        for _ in range(5):
            V_ref = update_layer(
                V_ref, data, LayerTerms.of(data, learned, 0.4, 0.2, ridge), learned, omega
            )
            out = update_layer(
                V, data, LayerTerms.of(data, fixed, 0.4, 0.2, ridge), fixed, omega, workspace
            )
            assert out.data_ptr() == V.data_ptr()  # updated in place
        torch.testing.assert_close(V, V_ref, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("compact", [False, True])
def test_gram_product_is_differentiable_for_both_layouts(slide, compact):
    V0, terms_of = _data_terms(slide)
    G = terms_of["compact" if compact else "per-spot"].G
    G = G if compact else G.double()
    V = V0[:20].double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: gram_times(v, G[:20]), (V,))
    with torch.no_grad():
        full = gram_times(V, terms_of["per-spot"].G[:20].double())
    torch.testing.assert_close(gram_times(V, G[:20]).detach(), full, rtol=1e-2, atol=1e-6)


def test_training_with_compact_gram_matrices(slide, demo_reference):
    """Per-entry weights kept as bfloat16 upper triangles (Visium HD scale) train: gradients
    reach the parameters and the pass matches the full layout to bfloat16 accuracy."""
    prep, B, g = slide["prep"], slide["B"], slide["g"]
    gt = graph_tensors(slide["graph"])
    model = UnrolledNMF(*prep.B.shape, n_layers=20, omega=1.3)
    model.refresh_layers = (0, 5)
    V = model(slide["X"], B, g, gt, noise=slide["compact"])
    V.sum().backward()
    for name in ("log_lambda", "raw_sigma", "raw_omega", "log_type_weight"):
        grad = getattr(model, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    with torch.no_grad():
        full = model(slide["X"], B, g, gt, noise=slide["noise"])
    torch.testing.assert_close(V.detach(), full, rtol=0, atol=2e-2)

    reference = demo_reference.subset_genes(prep.genes)
    slides = make_training_slides(
        slide["xy"], slide["graph"], reference, n_slides=3, library_sizes=prep.library_size
    )
    report = train_unrolled(
        model, prep.B, prep.gene_weights, prep.mrna_content, slides[:2], slides[2:],
        epochs=2, overdispersion=0.2, compact_gram=True, min_improvement=0.0,
    )  # fmt: skip
    assert report.epochs == 2 and np.isfinite([report.val_rmse, report.train_rmse]).all()


@pytest.fixture
def default_device_meta():
    """Tensors created without an explicit device land on 'meta' and break any product with the
    CPU inputs: a check that every tensor follows its inputs' device, runnable without a GPU."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture
def models(slide):
    m, p = slide["prep"].B.shape
    return [UnrolledNMF(m, p, n_layers=12, tied=tied, omega=1.3) for tied in (True, False)]


@pytest.mark.parametrize("weights", [None, "noise", "compact"])
def test_tensors_follow_the_inputs_device(slide, models, weights, default_device_meta):
    prep, X, B, g, graph = slide["prep"], slide["X"], slide["B"], slide["g"], slide["graph"]
    gt = graph_tensors(graph, device="cpu")
    noise = None if weights is None else slide[weights]
    for model in models:
        model.refresh_layers = None if noise is None else (0, 5)
        V = model(X, B, g, gt, noise=noise)
        model.cell_fractions(V, prep.mrna_content, gt).sum().backward()
        assert V.device.type == "cpu" and V.dtype == torch.float32
        assert model.log_lambda.grad.device.type == "cpu"
        fit = UnrolledSolver(model).run(FitInputs(prep.X, B, g, graph, noise))
        assert fit.V.device.type == "cpu" and fit.V.dtype == torch.float32
    fit = ClassicSolver(max_iter=20).run(FitInputs(prep.X, B, g, graph))
    assert fit.V.device.type == "cpu" and fit.BtX.device.type == "cpu"
    fixed = inference_graph(graph.adjacency(1.0, 1.0), "cpu", torch.float32, kernel="torch")
    out = fixed.add_product(V.detach(), torch.zeros_like(V.detach()), 0.5)
    assert out.device.type == "cpu" and fixed.degree.device.type == "cpu"


def test_pick_device_checks_the_name():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(StlnmfError, match="unknown device 'gpu'"):
        pick_device("gpu")
    with pytest.raises(StlnmfError, match="not supported"):
        pick_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(StlnmfError, match="no CUDA"):
            pick_device("cuda")
    else:
        with pytest.raises(StlnmfError, match="visible"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
