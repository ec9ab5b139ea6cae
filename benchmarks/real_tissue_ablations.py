"""Ablations of `deconvolve`'s options on the real-tissue sets (seqfish_ob, osmfish_ss).

Reproduces the table of ../shared/docs/real-tissue-ablations.md: for each option, the RMSE
against the TRUE CELL FRACTIONS of our cell fractions / our mRNA fractions (both outputs scored
against the cell truth, as in that document), plus the RMSE of our mRNA fractions against the
true mRNA fractions. Public API only (`napari_stlnmf.deconvolve` keywords).

    python benchmarks/real_tissue_ablations.py [--out docs/bench_real_ablations.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OPTIONS = [
    ("default", {}),
    ("`min_proportion=0.05`", {"min_proportion": 0.05}),
    ("`min_proportion=0.0`", {"min_proportion": 0.0}),
    ("`fit_platform_effect=False`", {"fit_platform_effect": False}),
    ("`calibrate_noise=False`", {"calibrate_noise": False}),
    ('`gene_weighting="sqrt"`', {"gene_weighting": "sqrt"}),
    ('`method="classic"`', {"method": "classic"}),
    ("`n_markers=300`", {"n_markers": 300}),
    (
        "`min_proportion=0.0, fit_platform_effect=False`",
        {"min_proportion": 0.0, "fit_platform_effect": False},
    ),
]


def rmse(est, truth) -> float:
    e = est.reindex(index=truth.index, columns=truth.columns).to_numpy(float)
    e = e / np.maximum(e.sum(1, keepdims=True), 1e-12)
    return float(np.sqrt(np.mean((e - truth.to_numpy(float)) ** 2)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    import datasets as bd

    from napari_stlnmf import __version__, deconvolve

    sets = bd.real_tissue()
    cells = {}
    for label, kw in OPTIONS:
        for name, slide, ref, key, truth, truth_mrna, _ in sets:
            t0 = time.perf_counter()
            res = deconvolve(slide, ref, cell_type_key=key, seed=0, **kw)
            cells[label, name] = (
                rmse(res.cell_fractions, truth),
                rmse(res.mrna_fractions, truth),
                rmse(res.mrna_fractions, truth_mrna),
                time.perf_counter() - t0,
            )
            print(label, name, *(f"{v:.4f}" for v in cells[label, name]), file=sys.stderr)
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(HERE), "status", "--porcelain", "--", "../src", "."],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    names = [s[0] for s in sets]
    short = [n[n.rfind("(") + 1 : -1] if "(" in n else n for n in names]
    lines = [
        (
            f"Run on {time.strftime('%Y-%m-%d', time.gmtime())}, napari_stlnmf {__version__}, "
            f"commit {commit}{' (with uncommitted changes)' if dirty else ''}, seed 0, "
            "`OMP_NUM_THREADS=1 python benchmarks/real_tissue_ablations.py`. "
            "Each cell: RMSE vs the true **cell** fractions of our cell fractions / of our mRNA "
            "fractions (as in the shared ablations note), then in brackets our mRNA fractions vs "
            "the true **mRNA** fractions; the time is the whole `deconvolve` call."
        ),
        "",
        "| option | " + " | ".join(short) + " | time (s) |",
        "|---|" + "---|" * len(short) + "---|",
    ]
    for label, _ in OPTIONS:
        vals = [cells[label, n] for n in names]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{c:.3f} / {m:.3f} ({mm:.3f})" for c, m, mm, _ in vals)
            + " | "
            + " / ".join(f"{v[3]:.1f}" for v in vals)
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
