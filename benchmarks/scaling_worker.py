"""One scaling measurement in a fresh process (so peak memory is its own).

Usage: python scaling_worker.py N_SPOTS N_TYPES N_GENES {infer,train,flashdeconv} -> one JSON line.

``flashdeconv`` writes the same simulated slide and reference to disk and runs FlashDeconv in
its own venv (``make bench-peers``) through peers/run_peer.py, watching its resident memory:
it is stopped above ``STLNMF_BENCH_MEM_CAP_GB`` (default 20) so the machine stays usable.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

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


HERE = Path(__file__).resolve().parent
MEM_CAP_GB = float(os.environ.get("STLNMF_BENCH_MEM_CAP_GB", "20"))


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MB), from /proc."""
    total, todo = 0.0, [pid]
    while todo:
        q = todo.pop()
        try:
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += float(line.split()[1]) / 1024
            kids = Path(f"/proc/{q}/task/{q}/children").read_text().split()
            todo += [int(k) for k in kids]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def run_flashdeconv(n, p, m, slide, ref) -> dict:
    python = HERE / ".venvs" / "flashdeconv" / "bin" / "python"
    rec = {
        "n_spots": n,
        "n_types": p,
        "n_genes": m,
        "what": "flashdeconv",
        "n_genes_used": None,
        "graph_s": float("nan"),
        "training_s": 0.0,
        "inference_s": float("nan"),
        "preparing_s": float("nan"),
    }
    if not python.exists():
        return {
            **rec,
            "seconds": float("nan"),
            "peak_rss_mb": float("nan"),
            "rss_before_mb": float("nan"),
            "note": "FlashDeconv venv missing (make bench-peers)",
        }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide.write_h5ad(tmp / "slide.h5ad")
        ref.write_h5ad(tmp / "ref.h5ad")
        del slide, ref
        cmd = [
            str(python),
            str(HERE / "peers" / "run_peer.py"),
            "--method",
            "flashdeconv",
            "--slide",
            str(tmp / "slide.h5ad"),
            "--reference",
            str(tmp / "ref.h5ad"),
            "--cell-type-key",
            "cell_type",
            "--out",
            str(tmp / "p.csv"),
            "--seed",
            "0",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, note, t0 = 0.0, "", time.perf_counter()
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mb(proc.pid))
            if peak > MEM_CAP_GB * 1024:
                proc.kill()
                note = (
                    f"stopped: memory above the {MEM_CAP_GB:.0f} GB cap "
                    f"after {time.perf_counter() - t0:.0f} s"
                )
                break
            if time.perf_counter() - t0 > 3600:
                proc.kill()
                note = "stopped: over one hour"
                break
            time.sleep(0.2)
        err = proc.communicate()[1] or ""
        side = tmp / "p.csv.json"
        info = json.loads(side.read_text()) if side.exists() and not note else {}
        if not note and proc.returncode != 0:
            note = "failed: " + (err.strip().splitlines() or ["no output"])[-1][:150]
    secs = info.get("fit_time_s", float("nan"))
    return {
        **rec,
        "seconds": secs,
        "inference_s": secs,
        "peak_rss_mb": max(peak, info.get("peak_rss_mb", 0.0)) if not note else peak,
        "rss_before_mb": float("nan"),
        "note": note,
    }


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
    slide = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"b{i}" for i in range(n)]),
        var=pd.DataFrame(index=ref.var_names),
    )
    slide.obsm["spatial"] = square_bins(n)
    if what == "flashdeconv":
        del X, V
        print(json.dumps(run_flashdeconv(n, p, m, slide, ref)))
        return
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
    res = deconvolve(
        slide,
        R,
        train=(what == "train"),
        progress=progress,
        n_markers=max(2000 // p, 20),
        train_epochs=60,
        seed=0,
    )
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
    print(
        json.dumps(
            {
                "n_spots": n,
                "n_types": p,
                "n_genes": m,
                "what": what,
                "seconds": total,
                "graph_s": stages.get("graph", 0.0),
                "platform_s": stages.get("platform", 0.0),
                "training_s": stages.get("training", 0.0) + stages.get("simulating", 0.0),
                "inference_s": stages.get("deconvolving", 0.0),
                "preparing_s": stages.get("preparing", 0.0),
                "peak_rss_mb": rss,
                "rss_before_mb": rss_before,
                "n_genes_used": res.info["n_genes_used"],
                "note": "",
            }
        )
    )


if __name__ == "__main__":
    main()
