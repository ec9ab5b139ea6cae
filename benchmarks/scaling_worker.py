"""One scaling measurement in a fresh process (so peak memory is its own).

Usage: python scaling_worker.py N_SPOTS N_TYPES N_GENES {infer,train} -> one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

warnings.simplefilter("ignore")


def square_bins(n):
    side = int(np.ceil(np.sqrt(n)))
    r, c = np.divmod(np.arange(n), side)
    return np.column_stack([c, r]).astype(float) * 8.0  # 8 µm bins, like Visium HD


def sparse_counts(V, profiles, counts_per_spot, rng):
    """Sparse multinomial counts: each spot's reads drawn from its mixture (never dense)."""
    n, p = V.shape
    m = profiles.shape[0]
    cdf = np.cumsum(profiles, axis=0).T  # p x m
    k = rng.poisson(counts_per_spot, size=n)
    spot = np.repeat(np.arange(n, dtype=np.int32), k)
    gene = np.empty(spot.size, dtype=np.int32)
    cum_v = np.cumsum(V, 1)
    for start in range(0, spot.size, 2_000_000):  # chunks keep the generator's memory small
        s = spot[start : start + 2_000_000]
        t = (rng.random(s.size)[:, None] > cum_v[s]).sum(1).clip(0, p - 1)
        u = rng.random(s.size)
        g = np.empty(s.size, dtype=np.int32)
        for j in range(p):
            sel = t == j
            g[sel] = np.searchsorted(cdf[j], u[sel]).clip(0, m - 1)
        gene[start : start + s.size] = g
    X = sp.csr_matrix((np.ones(spot.size, np.float32), (spot, gene)), shape=(n, m))
    X.sum_duplicates()
    return X


def main():
    n, p, m, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    import anndata as ad

    from napari_stlnmf import deconvolve
    from napari_stlnmf.datasets import make_reference

    rng = np.random.default_rng(0)
    ref = make_reference(n_types=p, n_genes=m, cells_per_type=60, seed=1)
    from napari_stlnmf.preprocess import build_reference

    R = build_reference(ref, cell_type_key="cell_type")
    V = rng.dirichlet(np.full(p, 0.3), size=n)
    X = sparse_counts(V, R.profiles.to_numpy(), 150 if n > 100_000 else 2000, rng)
    slide = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"b{i}" for i in range(n)]), var=pd.DataFrame(index=ref.var_names))
    slide.obsm["spatial"] = square_bins(n)
    stages = {}
    last = [time.perf_counter(), None]

    def progress(stage, i, total):
        now = time.perf_counter()
        if stage != last[1]:
            if last[1] is not None:
                stages[last[1]] = stages.get(last[1], 0) + now - last[0]
            last[0], last[1] = now, stage

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = deconvolve(slide, R, train=(what == "train"), progress=progress, n_markers=max(2000 // p, 20),
                     train_epochs=60, seed=0)
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
    print(json.dumps({
        "n_spots": n, "n_types": p, "n_genes": m, "what": what, "seconds": total,
        "graph_s": stages.get("graph", 0.0), "training_s": stages.get("training", 0.0) + stages.get("simulating", 0.0),
        "inference_s": stages.get("deconvolving", 0.0), "preparing_s": stages.get("preparing", 0.0),
        "peak_rss_mb": rss, "rss_before_mb": rss_before, "n_genes_used": res.info["n_genes_used"],
    }))


if __name__ == "__main__":
    main()
