"""Experiment that led to the per-entry weights now inside the model (``gene_weighting='nb'``):
plain IRLS with per-entry negative-binomial weights, per spot and gene, outside the network.

    export OMP_NUM_THREADS=1 PYTHONPATH=src
    python benchmarks/per_entry_weights.py demo,sim_hex_smooth_p0_deep
    python benchmarks/per_entry_weights.py demo --graph   # from the trained V

For each held-out suite slide: the quick first fit (default parameters, 50 layers, 1/sqrt(mean)
gene weights, no graph), then 300 multiplicative updates of weighted least squares with weights
``1 / (mu/L + phi mu^2)`` per spot and gene (``mu`` the current fit, ``L`` the spot's library,
``phi`` the overdispersion estimate_noise measures), refreshed every 20 updates (IRLS) — 'poisson'
drops the ``phi`` term. No graph, no training. Prints (mRNA RMSE, cell RMSE). It is the shape of
RCTD's likelihood; the model's version is in docs/method.md, "Per-entry noise weights". The quick
first fit below uses 'sqrt' gene weights explicitly (the package default is now 'nb').
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.simplefilter("ignore")

import accuracy_suite as suite

from napari_stlnmf.calibration import estimate_noise, fit_platform_effect, quick_fit
from napari_stlnmf.metrics import rmse
from napari_stlnmf.model import finalize_proportions, to_cell_fractions
from napari_stlnmf.pipeline import load_reference, shipped_refinement_model
from napari_stlnmf.preprocess import prepare


class Slide:
    """A suite slide prepared as deconvolve prepares it (platform effect corrected), with the
    quick first fit, the measured overdispersion φ and a scorer against both truths."""

    def __init__(self, name):
        d = suite.DATASETS[name]()
        self.data = d
        ref = load_reference(d["reference"], d["key"])
        prep = prepare(d["slide"].X, d["slide"].var_names, ref)
        prep, _ = fit_platform_effect(prep, seed=0, refine_with=shipped_refinement_model(prep))
        self.prep = prep
        self.V0 = quick_fit(prep, np.arange(prep.X.shape[0]))
        self.X = prep.X.toarray().astype(np.float64)
        self.L = prep.library_size.astype(np.float64)
        self.B = prep.B.astype(np.float64)
        self.phi = estimate_noise(prep.X, prep.library_size, prep.B, self.V0).overdispersion
        self.truth_mrna = np.asarray(d.get("truth_mrna", d["truth"]), float)[prep.spot_mask]
        self.truth_cell = np.asarray(d["truth"], float)[prep.spot_mask]

    def score(self, V):
        """(mRNA RMSE, cell RMSE) of selected-gene mRNA shares V, as deconvolve finalises them."""
        V = V / V.sum(1, keepdims=True)
        mrna = finalize_proportions(V / self.prep.gene_share[None], 0.05)
        cell = finalize_proportions(to_cell_fractions(V, self.prep.mrna_content), 0.05)
        return round(rmse(mrna, self.truth_mrna), 4), round(rmse(cell, self.truth_cell), 4)

    def weighted_updates(
        self, V, n_updates, *, nb=True, lam1=0.0, lam2=0.0, graph=None, gram_scaled=False
    ):
        """Multiplicative updates of least squares with per-entry weights ``1/(μ/L + φμ²)``
        (``nb=False``: Poisson only), refreshed every 20 updates; optional graph (``graph`` =
        (A, degree)) and sum-to-one terms. ``gram_scaled``: weights scaled so that
        mean diag(Bᵀ W_s B) = 1 (the gene weights' scale, for the λ's), else mean W = 1."""
        X, L, B = self.X, self.L, self.B
        V = V.copy()
        for it in range(n_updates):
            if it % 20 == 0:
                mu = np.maximum(V @ B.T, 1e-9)
                W = 1.0 / (mu / L[:, None] + (self.phi * mu**2 if nb else 0.0))
                W /= np.mean((W[:, :, None] * B[None] ** 2).sum(1)) if gram_scaled else W.mean()
            num = (W * X) @ B + lam2
            den = (W * (V @ B.T)) @ B + lam2 * V.sum(1, keepdims=True) + 1e-12
            if graph is not None and lam1:
                A, degree = graph
                num = num + lam1 * (A @ V)
                den = den + lam1 * degree * V
            V *= num / den
        return V


def main(names):
    for name in names:
        s = Slide(name)
        print(f"{name}: phi {s.phi:.3f}; quick fit {s.score(s.V0)}")
        for mode in ("poisson", "nb"):
            print(f"  per-entry {mode}: {s.score(s.weighted_updates(s.V0, 300, nb=mode == 'nb'))}")


def with_graph(names, graph_multipliers=(0.0, 0.5, 1.0, 2.0), n_updates=100):
    """From the trained model's V: per-entry NB-weighted updates plus the graph and sum-to-one
    terms (λ1 = multiplier x the trained layers' median λ1; λ2 their median), weights scaled so
    that mean diag(Bᵀ W_s B) = 1 as the gene weights are. ``--graph`` on the command line."""
    from napari_stlnmf import deconvolve
    from napari_stlnmf.graph import build_graph

    for name in names:
        s = Slide(name)
        d, prep = s.data, s.prep
        res = deconvolve(
            d["slide"],
            d["reference"],
            cell_type_key=d["key"],
            seed=0,
            min_proportion=0.0,
            gene_weighting="fitted",
        )  # the per-gene model the experiment started from
        Vt = res.mrna_fractions.to_numpy()[prep.spot_mask] * prep.gene_share[None]
        Vt = np.maximum(Vt / Vt.sum(1, keepdims=True), 1e-6)
        lam = res.model.lambdas().detach().numpy()
        sig = res.model.sigmas().detach().numpy()
        xy = np.asarray(d["slide"].obsm["spatial"], float)[prep.spot_mask]
        A = build_graph(xy).adjacency(float(sig[0]), float(sig[1]))
        graph = (A, np.asarray(A.sum(1)).ravel()[:, None])
        out = [f"trained {s.score(Vt)}"]
        for g in graph_multipliers:
            V = s.weighted_updates(
                Vt,
                n_updates,
                lam1=float(np.median(lam[:, 0])) * g,
                lam2=float(np.median(lam[:, 1])),
                graph=graph,
                gram_scaled=True,
            )
            out.append(f"λ1 x{g} {s.score(V)}")
        print(name, " | ".join(out), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--graph"]
    names = args[0].split(",") if args else ["demo"]
    with_graph(names) if "--graph" in sys.argv else main(names)
