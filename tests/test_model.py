"""The multiplicative update: monotone objective, unrolled == classic, finite gradients."""

import numpy as np
import pytest
import torch

from napari_stlnmf.datasets import hex_layout
from napari_stlnmf.graph import build_graph
from napari_stlnmf.model import (
    EntryNoise,
    UnrolledNMF,
    entry_weighted_gram,
    finalize_proportions,
    gram_times,
    graph_tensors,
    objective,
    solve,
    to_cell_fractions,
)
from napari_stlnmf.preprocess import prepare
from napari_stlnmf.simulate import simulate_slide
from napari_stlnmf.updates import LayerTerms, LearnedGraph, SharedGram, update_layer


@pytest.fixture(scope="module")
def problem(demo_reference):
    xy = hex_layout(10, 12)
    graph = build_graph(xy, features=np.random.default_rng(1).normal(size=(len(xy), 3)))
    sim = simulate_slide(xy, demo_reference, kind="regions", seed=3, platform_sigma=0.2)
    prep = prepare(sim.counts, demo_reference.genes, demo_reference)
    X = torch.as_tensor(prep.X.toarray(), dtype=torch.float64)
    B = torch.as_tensor(prep.B, dtype=torch.float64)
    g = torch.as_tensor(prep.gene_weights, dtype=torch.float64)
    return {"xy": xy, "graph": graph, "sim": sim, "prep": prep, "X": X, "B": B, "g": g}


def test_classic_update_never_increases_objective(problem):
    Xw = problem["X"] * problem["g"]
    Bw = problem["B"] * problem["g"][:, None]
    A = problem["graph"].adjacency(1.0, 1.0)
    lam1, lam2, ridge = 0.5, 0.3, torch.full((Bw.shape[1],), 0.01, dtype=torch.float64)
    BtX, BtB = Xw @ Bw, Bw.T @ Bw
    V = (
        torch.rand(
            Xw.shape[0],
            Bw.shape[1],
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(0),
        )
        + 0.1
    )
    graph = _learned_graph(problem["graph"], torch.float64)
    data = SharedGram(BtX, BtB)
    terms = LayerTerms.of(data, graph, lam1, lam2, ridge)
    values = [objective(V, Xw, Bw, lam1, lam2, ridge, A)]
    for _ in range(60):
        V = update_layer(V, data, terms, graph, 1.0)
        values.append(objective(V, Xw, Bw, lam1, lam2, ridge, A))
    diffs = np.diff(values)
    assert (diffs <= 1e-9 * abs(values[0])).all(), diffs.max()
    assert values[-1] < 0.5 * values[0]


def _learned_graph(graph, dtype):
    """The graph of ``graph.adjacency(1, 1)`` as the training path's differentiable operator."""
    g = {
        k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in graph_tensors(graph).items()
    }
    return LearnedGraph(g, 1.0, 1.0)


def test_fused_solver_equals_reference_update(problem):
    """The in-place inference path (buffers, scipy's kernel) computes the out-of-place layer."""
    Xw = (problem["X"] * problem["g"]).float()
    Bw = (problem["B"] * problem["g"][:, None]).float()
    A = problem["graph"].adjacency(1.0, 1.0)
    ridge = torch.full((Bw.shape[1],), 0.02)
    BtX, BtB = Xw @ Bw, Bw.T @ Bw
    V = torch.full((Xw.shape[0], Bw.shape[1]), 1.0 / Bw.shape[1])
    graph = _learned_graph(problem["graph"], torch.float32)
    data = SharedGram(BtX, BtB)
    terms = LayerTerms.of(data, graph, 0.4, 0.2, ridge)
    for _ in range(25):
        V = update_layer(V, data, terms, graph, 1.0)
    fused = solve(BtX, BtB, adjacency=A, lam1=0.4, lam2=0.2, ridge=ridge, n_iter=25)
    torch.testing.assert_close(fused, V, rtol=1e-4, atol=1e-6)


def test_unrolled_layers_with_fixed_parameters_equal_classic(problem):
    p = problem["B"].shape[1]
    model = UnrolledNMF(
        problem["B"].shape[0],
        p,
        n_layers=30,
        lambda_graph=0.3,
        lambda_sum=0.2,
        lambda_ridge=0.01,
        sigma_distance=1.2,
        sigma_feature=0.9,
    ).double()
    gt = graph_tensors(problem["graph"])
    gt = {
        k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in gt.items()
    }
    with torch.no_grad():
        V_unrolled = model(problem["X"], problem["B"], problem["g"], gt)
        BtX, BtB = model.gram(problem["X"], problem["B"], problem["g"])
    s = model.sigmas().detach().numpy()
    A = problem["graph"].adjacency(float(s[0]), float(s[1]))
    V_classic = solve(
        BtX,
        BtB,
        adjacency=A,
        lam1=0.3,
        lam2=0.2,
        ridge=torch.full((p,), 0.02, dtype=torch.float64),
        n_iter=30,
    )
    torch.testing.assert_close(V_unrolled, V_classic, rtol=1e-6, atol=1e-9)
    V_infer = model.infer(problem["X"], problem["B"], problem["g"], problem["graph"])
    torch.testing.assert_close(V_infer, V_classic, rtol=1e-6, atol=1e-9)


def test_gradients_are_finite_and_reach_every_parameter(problem):
    model = UnrolledNMF(problem["B"].shape[0], problem["B"].shape[1], n_layers=20, tied=False)
    X, B, g = problem["X"].float(), problem["B"].float(), problem["g"].float()
    graph = graph_tensors(problem["graph"])
    V = model(X, B, g, graph)
    truth = torch.as_tensor(problem["sim"].cell_fractions, dtype=torch.float32)
    loss = ((model.cell_fractions(V, problem["prep"].mrna_content, graph) - truth) ** 2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # σ's get gradients through the graph weights


def test_outputs_non_negative_and_sum_to_one(problem):
    model = UnrolledNMF(problem["B"].shape[0], problem["B"].shape[1], n_layers=50)
    V = model.infer(
        problem["X"].float(), problem["B"].float(), problem["g"].float(), problem["graph"]
    ).numpy()
    out = finalize_proportions(to_cell_fractions(V, problem["prep"].mrna_content), 0.05)
    assert (out >= 0).all()
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-9)
    assert ((out == 0) | (out >= 0.05)).all()


def test_cell_fraction_head_same_in_training_and_inference(problem, tmp_path):
    """The cell-fraction head smooths over the graph the same way on the differentiable path
    (tensors) and at inference (scipy); rows still sum to one; a file saved before the head
    existed loads without smoothing."""
    model = UnrolledNMF(
        problem["B"].shape[0], problem["B"].shape[1], n_layers=30, cell_smoothing=0.5
    )
    V = model.infer(
        problem["X"].float(), problem["B"].float(), problem["g"].float(), problem["graph"]
    )
    content = problem["prep"].mrna_content
    with torch.no_grad():
        trained = model.cell_fractions(V, content, graph_tensors(problem["graph"])).numpy()
    inferred = model.cell_fractions(V.numpy().astype(np.float64), content, problem["graph"])
    np.testing.assert_allclose(trained, inferred, atol=1e-5)
    np.testing.assert_allclose(inferred.sum(1), 1.0, atol=1e-6)
    plain = to_cell_fractions(V.numpy().astype(np.float64), content)
    assert np.abs(inferred - plain).max() > 1e-3  # it does smooth
    path = model.save(tmp_path / "old.pt")
    blob = torch.load(path, weights_only=True)
    del blob["state"]["log_cell_smoothing"]
    torch.save(blob, path)
    old, _ = UnrolledNMF.load(path)
    np.testing.assert_allclose(
        old.cell_fractions(V.numpy().astype(np.float64), content, problem["graph"]),
        plain,
        atol=1e-6,
    )


def test_cell_fraction_conversion():
    V = np.array([[0.5, 0.5]])
    np.testing.assert_allclose(to_cell_fractions(V, [1000.0, 3000.0]), [[0.75, 0.25]])


def test_save_and_load_roundtrip(tmp_path, problem):
    m, p = problem["B"].shape
    model = UnrolledNMF(m, p, n_layers=12, lambda_graph=0.7)
    with torch.no_grad():
        model.log_gene_weight.copy_(torch.linspace(-1, 1, m))
    genes = [f"g{i}" for i in range(m)]
    path = model.save(tmp_path / "params.pt", genes=genes, cell_types=[str(i) for i in range(p)])
    assert path.stat().st_size < 200_000
    # load onto a reordered gene list: weights follow the names
    loaded, _ = UnrolledNMF.load(path, genes=genes[::-1] + ["unknown"], n_types=p)
    assert loaded.n_layers == 12
    assert float(loaded.lambdas()[0, 0]) == pytest.approx(0.7, rel=1e-5)
    np.testing.assert_allclose(
        loaded.log_gene_weight.detach().numpy()[:m],
        np.linspace(-1, 1, m)[::-1],
        rtol=1e-5,
        atol=1e-6,  # torch's float32 linspace is ~3e-8, not 0, at the middle of an odd count
    )
    assert float(loaded.log_gene_weight[-1]) == 0.0


def test_inference_damps_an_over_relaxation_that_diverges(problem):
    """Strong graph coupling with ω near 2 makes the over-relaxed update oscillate between
    neighbours and blow up (as Jacobi over-relaxation does); inference halves ω until the
    updates stay bounded and says so."""
    prep, graph = problem["prep"], problem["graph"]
    B, g = torch.as_tensor(prep.B), torch.as_tensor(prep.gene_weights)
    model = UnrolledNMF(*prep.B.shape, lambda_graph=5.0, omega=1.99)
    with pytest.warns(RuntimeWarning, match="diverged"):
        V = model.infer(prep.X, B, g, graph)
    assert torch.isfinite(V).all() and float(V.sum(1).max()) < 2.0
    plain = solve(
        *model.gram(prep.X, B, g),
        adjacency=graph.adjacency(*model.sigmas().tolist()),
        lam1=5.0,
        lam2=float(model.lambdas().detach()[0, 1]),
        ridge=model.ridge()[0].detach().numpy(),
        n_iter=100,
        omega=1.99,
    )
    assert (
        not torch.isfinite(plain).all() or float(plain.sum(1).max()) >= 10.0
    )  # undamped, it does diverge


def test_damping_reaches_the_plain_update_in_a_few_reruns(problem, monkeypatch):
    """Updates that stay unbounded whatever ω (here: every check fails) are re-run a few times,
    ending with ω = 1, not once per halving of an ever smaller excess."""
    import napari_stlnmf.model as model_module

    prep, graph = problem["prep"], problem["graph"]
    B, g = torch.as_tensor(prep.B), torch.as_tensor(prep.gene_weights)
    monkeypatch.setattr(model_module, "_bounded", lambda V: False)
    model = UnrolledNMF(*prep.B.shape, omega=1.99)
    with pytest.warns(RuntimeWarning, match="diverged") as caught:
        model.infer(prep.X, B, g, graph)
    messages = [str(w.message) for w in caught if "diverged" in str(w.message)]
    assert 2 <= len(messages) <= 6, messages
    assert messages[-1].endswith("re-running with ω=1.00")


def test_entry_weighted_gram_is_the_negative_binomial_weighted_normal_equation(problem):
    """``BtX_s = Bᵀ W_s x_s`` and ``G_s = Bᵀ diag(W_s) B`` with ``W = 1/(μ/L + φμ²)``, formed in
    blocks from a sparse X exactly as densely; with Poisson weights ``G_s v_s ∝ L_s`` (the
    columns of B sum to one), the identity behind Poisson regression's multiplicative update."""
    prep = problem["prep"]
    X, B = prep.X, torch.as_tensor(prep.B, dtype=torch.float64)
    V = torch.as_tensor(problem["sim"].cell_fractions, dtype=torch.float64) * 0.8 + 0.2 / B.shape[1]
    lib = torch.as_tensor(prep.library_size, dtype=torch.float64)
    BtX, G = entry_weighted_gram(X, B, V, EntryNoise(lib, 0.3), chunk=17)
    mu = V @ B.T
    W = 1.0 / (mu / lib[:, None] + 0.3 * mu**2)
    G_ref = torch.einsum("sg,gk,gl->skl", W, B, B)
    scale = G_ref.diagonal(dim1=1, dim2=2).mean()
    torch.testing.assert_close(G, G_ref / scale)
    Xd = torch.as_tensor(X.toarray(), dtype=torch.float64)
    torch.testing.assert_close(BtX, (W * Xd) @ B / scale)
    _, G0 = entry_weighted_gram(X, B, V, EntryNoise(lib, 0.0))
    Gv = torch.bmm(G0, V.unsqueeze(2)).squeeze(2)
    ratio = Gv / lib[:, None]
    torch.testing.assert_close(
        ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-6, atol=0
    )
    # compact storage (bfloat16 upper triangles, for 10^6 bins x many types): same products
    BtX_c, G_c = entry_weighted_gram(X, B, V, EntryNoise(lib, 0.3, compact_gram=True), chunk=17)
    p = B.shape[1]
    assert G_c.dtype == torch.bfloat16 and G_c.shape == (V.shape[0], p * (p + 1) // 2)
    torch.testing.assert_close(
        BtX_c, BtX, rtol=1e-3, atol=0
    )  # the scale is read off bfloat16 diagonals
    vG = gram_times(V, G_c, torch.empty_like(V))
    torch.testing.assert_close(vG, gram_times(V, G, torch.empty_like(V)), rtol=1e-2, atol=1e-6)


def test_entry_weighted_layers_train_and_infer_alike(problem, tmp_path):
    """A per-entry-weights model: the differentiable pass and the in-place inference give the
    same V, gradients reach the λ's, σ's and ω, and save/load keeps the refresh schedule."""
    prep = problem["prep"]
    m, p = prep.B.shape
    X = torch.as_tensor(prep.X.toarray())
    B = torch.as_tensor(prep.B)
    noise = EntryNoise(torch.as_tensor(prep.library_size, dtype=torch.float32), 0.2)
    model = UnrolledNMF(m, p, n_layers=30, tied=False, lambda_graph=0.3, omega=1.3)
    model.refresh_layers = (0, 5, 15)
    with pytest.raises(ValueError, match="per-entry"):
        model(X, B, problem["g"].float())
    V = model(X, B, problem["g"].float(), graph_tensors(problem["graph"]), noise=noise)
    V_infer = model.infer(prep.X, B, problem["g"].float(), problem["graph"], noise=noise)
    torch.testing.assert_close(V.detach(), V_infer, rtol=2e-4, atol=1e-6)
    truth = torch.as_tensor(problem["sim"].cell_fractions, dtype=torch.float32)
    ((to_cell_fractions(V, prep.mrna_content) - truth) ** 2).mean().backward()
    for name in ("log_lambda", "raw_sigma", "raw_omega", "log_type_weight"):
        grad = getattr(model, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    loaded, _ = UnrolledNMF.load(model.save(tmp_path / "nb.pt"), n_types=p)
    assert loaded.refresh_layers == (0, 5, 15)
    torch.testing.assert_close(
        loaded.infer(prep.X, B, problem["g"].float(), problem["graph"], noise=noise), V_infer
    )


def test_entry_weights_of_a_shared_fit_are_computed_per_library_size(problem):
    """At the uniform start every spot has the same fit, so the weights depend on the library
    size only and are formed once per distinct size: the same numbers as spot by spot."""
    prep = problem["prep"]
    B = torch.as_tensor(prep.B, dtype=torch.float64)
    n, p = prep.X.shape[0], B.shape[1]
    lib = torch.as_tensor(
        np.round(prep.library_size / 50) * 50, dtype=torch.float64
    )  # few distinct sizes
    assert len(torch.unique(lib)) <= n // 2
    V = torch.full((n, p), 1.0 / p, dtype=torch.float64)
    nudged = V.clone()
    nudged[0, 0] *= 1 + 1e-12  # not exactly shared: the spot-by-spot path
    BtX, G = entry_weighted_gram(prep.X, B, V, EntryNoise(lib, 0.2))
    BtX_ref, G_ref = entry_weighted_gram(prep.X, B, nudged, EntryNoise(lib, 0.2))
    torch.testing.assert_close(G, G_ref)
    torch.testing.assert_close(BtX, BtX_ref)
