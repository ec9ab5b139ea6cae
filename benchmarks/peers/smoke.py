#!/usr/bin/env python
"""Smoke test of the peer deconvolution methods on a small simulated slide.

Runs with the main project venv (needs only numpy, pandas, scipy, anndata):

    python benchmarks/peers/smoke.py [--methods flashdeconv rctd ...] [--outdir DIR]
                                     [--epochs N] [--timeout 3600]

Simulation: 5 cell types, 300 genes, a single-cell reference of 1000 cells
(negative-binomial counts, type-specific library sizes and ~25 marker genes per
type), and a 20 x 15 grid of 300 spots; each spot sums the counts of Poisson(8)
fresh cells drawn with spatially smooth type probabilities, thinned to 50%
capture.  Truth is kept as cell fractions and as mRNA (UMI) fractions, since
methods estimate one or the other (see the sidecar's ``quantity``).

Every peer whose venv is complete (benchmarks/.venvs/<group>/.peer-complete) is
run through ``run_peer.py`` in a subprocess; prints RMSE vs both truths, Pearson
r, wall time and peak RSS, and writes ``results.csv`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
VENVS = Path(os.environ.get("PEER_VENVS", HERE.parent / ".venvs"))
METHODS = ["flashdeconv", "rctd", "cell2location", "stereoscope", "destvi", "tangram"]
GROUP = {
    "flashdeconv": "flashdeconv",
    "rctd": "rctd",
    "cell2location": "scvi",
    "stereoscope": "scvi",
    "destvi": "scvi",
    "tangram": "tangram",
}


def simulate(
    seed: int = 0,
    n_types: int = 5,
    n_genes: int = 300,
    n_ref: int = 1000,
    nx: int = 20,
    ny: int = 15,
    cells_per_spot: float = 8.0,
    capture: float = 0.5,
    theta: float = 5.0,
):
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    types = [f"type_{chr(ord('A') + k)}" for k in range(n_types)]
    genes = [f"gene_{g:03d}" for g in range(n_genes)]
    # expression shares: shared baseline * type-specific log-normal noise * markers
    base = rng.gamma(0.6, 1.0, n_genes) + 0.05
    prof = base[None, :] * rng.lognormal(0.0, 0.5, (n_types, n_genes))
    for k in range(n_types):
        mk = rng.choice(n_genes, 25, replace=False)
        prof[k, mk] *= rng.uniform(4, 10, 25)
    prof /= prof.sum(1, keepdims=True)
    lib_mean = np.linspace(1500, 4000, n_types)  # types differ in RNA content

    def cells(labels):
        lib = lib_mean[labels] * rng.lognormal(0.0, 0.3, len(labels))
        mu = lib[:, None] * prof[labels]
        lam = rng.gamma(theta, mu / theta)  # NB = Poisson-Gamma
        return rng.poisson(lam)

    ref_labels = np.repeat(np.arange(n_types), n_ref // n_types)
    ref_X = cells(ref_labels)
    ref = ad.AnnData(
        sp.csr_matrix(ref_X.astype(np.float32)),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(np.array(types)[ref_labels])},
            index=[f"cell_{i:04d}" for i in range(len(ref_labels))],
        ),
        var=pd.DataFrame(index=genes),
    )

    # spatially smooth type probabilities: each type has a Gaussian "territory"
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
    coords = np.c_[xx.ravel(), yy.ravel()].astype(float)
    centres = rng.uniform([0, 0], [nx, ny], (n_types, 2))
    d2 = ((coords[:, None, :] - centres[None]) ** 2).sum(-1)
    logits = -d2 / (2 * 5.0**2) * 3.0
    pk = np.exp(logits - logits.max(1, keepdims=True))
    pk = 0.15 / n_types + 0.85 * pk / pk.sum(1, keepdims=True)
    n_spots = len(coords)
    Y = np.zeros((n_spots, n_genes), np.int64)
    cell_frac = np.zeros((n_spots, n_types))
    mrna_frac = np.zeros((n_spots, n_types))
    for s in range(n_spots):
        n = max(1, rng.poisson(cells_per_spot))
        lab = rng.choice(n_types, n, p=pk[s])
        X = cells(lab)
        X = rng.binomial(X, capture)
        Y[s] = X.sum(0)
        for k in range(n_types):
            cell_frac[s, k] = (lab == k).sum() / n
            mrna_frac[s, k] = X[lab == k].sum()
        mrna_frac[s] /= max(mrna_frac[s].sum(), 1)
    spots = [f"spot_{i:03d}" for i in range(n_spots)]
    slide = ad.AnnData(
        sp.csr_matrix(Y.astype(np.float32)),
        obs=pd.DataFrame(index=spots),
        var=pd.DataFrame(index=genes),
    )
    slide.obsm["spatial"] = coords
    truth_c = pd.DataFrame(cell_frac, index=spots, columns=types)
    truth_m = pd.DataFrame(mrna_frac, index=spots, columns=types)
    return slide, ref, truth_c, truth_m


def installed(method: str) -> Path | None:
    py = VENVS / GROUP[method] / "bin" / "python"
    return py if (VENVS / GROUP[method] / ".peer-complete").exists() and py.exists() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--outdir", default=str(HERE / "_smoke"))
    ap.add_argument("--epochs", type=int, default=None, help="passed to run_peer.py")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    slide, ref, truth_c, truth_m = simulate(a.seed)
    slide.write_h5ad(out / "slide.h5ad")
    ref.write_h5ad(out / "ref.h5ad")
    truth_c.to_csv(out / "truth_cell_fraction.csv")
    truth_m.to_csv(out / "truth_mrna_fraction.csv")
    print(
        f"simulated slide {slide.shape}, reference {ref.shape}, "
        f"mean UMI/spot {float(slide.X.sum(1).mean()):.0f}; outputs in {out}",
        flush=True,
    )

    rows = []
    for m in a.methods:
        py = installed(m)
        if py is None:
            rows.append({"method": m, "status": "not installed"})
            print(f"[{m}] not installed (run benchmarks/peers/install.sh {m})", flush=True)
            continue
        props_csv = out / f"{m}.csv"
        cmd = [
            str(py),
            str(HERE / "run_peer.py"),
            "--method",
            m,
            "--slide",
            str(out / "slide.h5ad"),
            "--reference",
            str(out / "ref.h5ad"),
            "--cell-type-key",
            "cell_type",
            "--out",
            str(props_csv),
            "--seed",
            str(a.seed),
        ]
        if a.epochs is not None:
            cmd += ["--epochs", str(a.epochs)]
        print(f"[{m}] {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        with open(out / f"{m}.log", "w") as log:
            try:
                rc = subprocess.run(
                    cmd, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.perf_counter() - t
        side = {}
        if Path(str(props_csv) + ".json").exists():
            side = json.loads(Path(str(props_csv) + ".json").read_text())
        row = {
            "method": m,
            "rc": rc,
            "status": side.get("status", "failed"),
            "wall_s": round(wall, 1),
            "peer_wall_s": side.get("wall_time_s"),
            "peak_rss_mb": side.get("peak_rss_mb"),
            "version": side.get("package_version"),
            "quantity": side.get("quantity", ""),
        }
        if rc == 0:
            p = pd.read_csv(props_csv, index_col=0).loc[truth_c.index, truth_c.columns]
            for name, tr in (("cell", truth_c), ("mrna", truth_m)):
                d = p.to_numpy() - tr.to_numpy()
                row[f"rmse_{name}"] = round(float(np.sqrt(np.mean(d**2))), 4)
                row[f"r_{name}"] = round(
                    float(np.corrcoef(p.to_numpy().ravel(), tr.to_numpy().ravel())[0, 1]), 4
                )
            row["rowsum_maxdev"] = float(np.abs(p.sum(1) - 1).max())
        else:
            row["reason"] = side.get("reason", f"exit {rc}, see {out / (m + '.log')}")
        rows.append(row)
        msg = {k: v for k, v in row.items() if k not in ("quantity",)}
        print(f"[{m}] {msg}", flush=True)

    # baseline: the mean composition everywhere (what a method knowing nothing would do)
    base = np.tile(truth_c.mean().to_numpy(), (len(truth_c), 1))
    rows.append(
        {
            "method": "(baseline: global mean)",
            "status": "ref",
            "rmse_cell": round(float(np.sqrt(np.mean((base - truth_c.to_numpy()) ** 2))), 4),
            "rmse_mrna": round(float(np.sqrt(np.mean((base - truth_m.to_numpy()) ** 2))), 4),
        }
    )
    df = pd.DataFrame(rows)
    df.to_csv(out / "results.csv", index=False)
    cols = [
        c
        for c in [
            "method",
            "status",
            "rmse_cell",
            "rmse_mrna",
            "r_cell",
            "r_mrna",
            "peer_wall_s",
            "peak_rss_mb",
            "version",
        ]
        if c in df.columns
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df[cols].to_string(index=False))
    for r in rows:
        if r.get("reason"):
            print(f"  {r['method']}: {r['reason']}")
    ok = all(r.get("status") in ("ok", "ref", "not installed", "unavailable") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
