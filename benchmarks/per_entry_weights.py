"""Experiment (not in the package yet): per-entry negative-binomial weights, per spot and gene.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/per_entry_weights.py demo,sim_hex_smooth_p0_deep

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


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["demo"])
