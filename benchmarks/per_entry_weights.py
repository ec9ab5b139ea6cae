"""Experiment (not in the package yet): per-entry negative-binomial weights, per spot and gene.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/per_entry_weights.py demo,sim_hex_smooth_p0_deep
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/per_entry_weights.py demo --graph   # from the trained V

For each held-out suite slide: the quick first fit (default parameters, 50 layers, 1/sqrt(mean)
gene weights, no graph), then 300 multiplicative updates of weighted least squares with weights
``1 / (mu/L + phi mu^2)`` per spot and gene (``mu`` the current fit, ``L`` the spot's library,
``phi`` the overdispersion estimate_noise measures), refreshed every 20 updates (IRLS) — 'poisson'
drops the ``phi`` term. No graph, no training. Prints (mRNA RMSE, cell RMSE). It is the shape of
RCTD's likelihood, and the lead for the next model change: see docs/method.md, "Next".
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.simplefilter("ignore")

import accuracy_suite as suite  # noqa: E402

from napari_stlnmf import api  # noqa: E402
from napari_stlnmf.metrics import rmse  # noqa: E402
from napari_stlnmf.model import finalize_proportions, to_cell_fractions  # noqa: E402
from napari_stlnmf.preprocess import prepare  # noqa: E402
from napari_stlnmf.train import estimate_noise  # noqa: E402


def main(names):
    for name in names:
        d = suite.DATASETS[name]()
        ref = api._as_reference(d["reference"], d["key"])
        prep = prepare(d["slide"].X, d["slide"].var_names, ref)
        prep, _ = api._fit_platform_effect(prep, 0)
        V0 = api._quick_fit(prep, np.arange(prep.X.shape[0]), prep.gene_scale)
        X = prep.X.toarray().astype(np.float64)
        L = prep.library_size.astype(np.float64)
        B = prep.B.astype(np.float64)
        phi = 1.0 / estimate_noise(prep.X, prep.library_size, prep.B, V0)["dispersion"]
        truth_mrna = np.asarray(d.get("truth_mrna", d["truth"]), float)[prep.spot_mask]
        truth_cell = np.asarray(d["truth"], float)[prep.spot_mask]

        def score(V):
            V = V / V.sum(1, keepdims=True)
            mrna = finalize_proportions(V / prep.gene_share[None], 0.05)
            cell = finalize_proportions(to_cell_fractions(V, prep.mrna_content), 0.05)
            return round(rmse(mrna, truth_mrna), 4), round(rmse(cell, truth_cell), 4)

        print(f"{name}: phi {phi:.3f}; quick fit {score(V0)}")
        for mode in ("poisson", "nb"):
            V = V0.copy()
            for it in range(300):
                if it % 20 == 0:
                    mu = np.maximum(V @ B.T, 1e-9)
                    W = 1.0 / (mu / L[:, None] + (phi * mu**2 if mode == "nb" else 0.0))
                    W /= W.mean()
                V *= ((W * X) @ B) / ((W * (V @ B.T)) @ B + 1e-12)
            print(f"  per-entry {mode}: {score(V)}")


def with_graph(names, graph_multipliers=(0.0, 0.5, 1.0, 2.0), n_updates=100):
    """From the trained model's V: per-entry NB-weighted updates plus the graph and sum-to-one
    terms (λ1 = multiplier x the trained layers' median λ1; λ2 their median), weights scaled so
    that mean diag(Bᵀ W_s B) = 1 as the gene weights are. ``--graph`` on the command line."""
    from napari_stlnmf import deconvolve
    from napari_stlnmf.graph import build_graph

    for name in names:
        d = suite.DATASETS[name]()
        res = deconvolve(d["slide"], d["reference"], cell_type_key=d["key"], seed=0, min_proportion=0.0)
        ref = api._as_reference(d["reference"], d["key"])
        prep = prepare(d["slide"].X, d["slide"].var_names, ref)
        prep, _ = api._fit_platform_effect(prep, 0)
        Vt = res.mrna_fractions.to_numpy()[prep.spot_mask] * prep.gene_share[None]
        Vt = np.maximum(Vt / Vt.sum(1, keepdims=True), 1e-6)
        X, B = prep.X.toarray().astype(np.float64), prep.B.astype(np.float64)
        L = prep.library_size.astype(np.float64)
        V0 = api._quick_fit(prep, np.arange(prep.X.shape[0]), prep.gene_scale)
        phi = 1.0 / estimate_noise(prep.X, prep.library_size, prep.B, V0)["dispersion"]
        truth_mrna = np.asarray(d["truth_mrna"], float)[prep.spot_mask]
        truth_cell = np.asarray(d["truth"], float)[prep.spot_mask]
        lam = res.model.lambdas().detach().numpy()
        sig = res.model.sigmas().detach().numpy()
        xy = np.asarray(d["slide"].obsm["spatial"], float)[prep.spot_mask]
        A = build_graph(xy).adjacency(float(sig[0]), float(sig[1]))
        deg = np.asarray(A.sum(1)).ravel()[:, None]

        def score(V):
            V = V / V.sum(1, keepdims=True)
            mrna = finalize_proportions(V / prep.gene_share[None], 0.05)
            cell = finalize_proportions(to_cell_fractions(V, prep.mrna_content), 0.05)
            return round(rmse(mrna, truth_mrna), 4), round(rmse(cell, truth_cell), 4)

        out = [f"trained {score(Vt)}"]
        for g in graph_multipliers:
            l1, l2 = float(np.median(lam[:, 0])) * g, float(np.median(lam[:, 1]))
            V = Vt.copy()
            for it in range(n_updates):
                if it % 20 == 0:
                    mu = np.maximum(V @ B.T, 1e-9)
                    W = 1.0 / (mu / L[:, None] + phi * mu**2)
                    W /= np.mean((W[:, :, None] * B[None] ** 2).sum(1))
                num = (W * X) @ B + l1 * (A @ V) + l2
                den = (W * (V @ B.T)) @ B + l1 * deg * V + l2 * V.sum(1, keepdims=True) + 1e-12
                V *= num / den
            out.append(f"λ1 x{g} {score(V)}")
        print(name, " | ".join(out), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--graph"]
    names = args[0].split(",") if args else ["demo"]
    with_graph(names) if "--graph" in sys.argv else main(names)
