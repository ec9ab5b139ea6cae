"""Near-pure regions (1-2 types per spot, 3-6 regions): STL NMF (default) vs FlashDeconv.

Slides of the simulator's ``'near_pure'`` kind, alternately on a Visium-like hex layout
(22 x 22) and on square bins (20 x 20), from several references x seeds; depth 1,000 / 3,000 /
10,000 counts per spot in turn, ~8 cells per spot, platform effect σ 0.3 (as the accuracy
suite's slides). References: synthetic ``make_reference`` (the slide's cells are another draw
of the same types, as in the suite) with 6, 10 and 15 types, and real single cells
(seqFISH+ olfactory bulb, osmFISH cortex) split in two halves per type: one half builds the
slide, the other is the reference.

Scoring: FlashDeconv estimates mRNA fractions, so its output is scored against the mRNA
truth; ours is scored twice, its cell fractions against the cell truth and its mRNA fractions
against the mRNA truth. FlashDeconv's outputs are cached (``--cache``): they do not depend on
our method.

Run (single thread)::

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python near_pure.py \\
        --out ../docs/bench_near_pure

FlashDeconv runs in its own venv (``make bench-peers``: benchmarks/.venvs/flashdeconv).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from accuracy_suite import SHARED, _slide, square_layout
from datasets import _read_sc

from napari_stlnmf import deconvolve
from napari_stlnmf.datasets import hex_layout, make_reference
from napari_stlnmf.metrics import mean_jensen_shannon, rmse
from napari_stlnmf.preprocess import build_reference
from napari_stlnmf.simulate import simulate_slide

KEY = "cell_type"
DEPTHS = (1000.0, 3000.0, 10000.0)
SYNTHETIC = {"synthetic_6": (6, 41), "synthetic_10": (10, 42), "synthetic_15": (15, 43)}
REAL = ("seqfish_ob", "osmfish_ss")


def synthetic_reference(n_types, seed):
    """(reference AnnData, the slide's cells as a Reference): two draws of the same types."""
    ref = make_reference(n_types=n_types, seed=seed)
    cells = make_reference(n_types=n_types, seed=seed, cell_seed=seed + 1)
    return ref, build_reference(cells, cell_type_key=KEY)


def real_halves(name, seed=11):
    """Real single cells split in two halves per type: (reference half, slide-cell half)."""
    sc = _read_sc(SHARED / name)
    labels = sc.obs[KEY].to_numpy()
    rng = np.random.default_rng(seed)
    half = np.zeros(sc.n_obs, dtype=bool)
    for t in np.unique(labels):
        idx = np.flatnonzero(labels == t)
        half[rng.choice(idx, size=idx.size // 2, replace=False)] = True
    ref, cells = sc[half].copy(), sc[~half].copy()
    # a type with a single cell has none in one half: keep only types present in both
    both = sorted(set(ref.obs[KEY]) & set(cells.obs[KEY]))
    ref = ref[ref.obs[KEY].isin(both)].copy()
    cells = cells[cells.obs[KEY].isin(both)].copy()
    for a in (ref, cells):
        a.obs[KEY] = pd.Categorical(a.obs[KEY].astype(str))
    return ref, build_reference(cells, cell_type_key=KEY)


def make_slide(cells, seed):
    hex_ = seed % 2 == 0
    xy = hex_layout(22, 22, pitch=100.0) if hex_ else square_layout(20, 20)
    depth = DEPTHS[seed % len(DEPTHS)]
    sim = simulate_slide(
        xy,
        cells,
        kind="near_pure",
        library_sizes=np.array([depth]),
        mean_cells=8.0,
        platform_sigma=0.3,
        seed=seed,
    )
    slide = _slide(sim.counts, xy, cells.genes)
    frame = lambda f: pd.DataFrame(f, index=slide.obs_names, columns=cells.cell_types)
    layout = "hex" if hex_ else "square"
    return slide, frame(sim.cell_fractions), frame(sim.mrna_fractions), layout, depth


def flashdeconv(slide, ref, cache: Path | None, tag: str):
    path = cache / f"{tag}.csv" if cache else None
    if path is not None and path.exists():
        return pd.read_csv(path, index_col=0), 0.0
    from run_benchmarks import peer

    run = peer("FlashDeconv", timeout=3600)
    if run is None:
        raise RuntimeError("FlashDeconv is not installed (make bench-peers)")
    t0 = time.perf_counter()
    props, _, _ = run(slide, ref, KEY)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        props.to_csv(path)
    return props, seconds


def scores(est: pd.DataFrame, truth: pd.DataFrame) -> tuple[float, float]:
    e = est.reindex(index=truth.index, columns=truth.columns).fillna(0.0).to_numpy()
    e = e / np.maximum(e.sum(1, keepdims=True), 1e-12)
    t = truth.to_numpy()
    return rmse(e, t), mean_jensen_shannon(e, t)


def run_all(references, seeds, cache, flash_scores=None, **deconvolve_kwargs) -> pd.DataFrame:
    """``flash_scores``: an earlier run's rows, whose FlashDeconv scores are taken for the same
    (reference, seed) instead of running it again (its slides do not depend on our code)."""
    earlier = None if flash_scores is None else flash_scores.set_index(["reference", "seed"])
    rows = []
    for rname in references:
        ref, cells = (
            synthetic_reference(*SYNTHETIC[rname]) if rname in SYNTHETIC else real_halves(rname)
        )
        for seed in seeds:
            slide, truth, truth_mrna, layout, depth = make_slide(cells, seed)
            tag = f"{rname}_seed{seed}"
            t0 = time.perf_counter()
            res = deconvolve(slide, ref, cell_type_key=KEY, seed=0, **deconvolve_kwargs)
            ours_s = time.perf_counter() - t0
            row = {"reference": rname, "seed": seed, "layout": layout, "depth": depth}
            row["ours_cell_rmse"], row["ours_cell_jsd"] = scores(res.proportions, truth)
            row["ours_mrna_rmse"], row["ours_mrna_jsd"] = scores(res.mrna_fractions, truth_mrna)
            if earlier is not None and (rname, seed) in earlier.index:
                old = earlier.loc[(rname, seed)]
                assert (old["layout"], float(old["depth"])) == (layout, float(depth)), tag
                row["flash_mrna_rmse"], row["flash_mrna_jsd"] = (
                    old.flash_mrna_rmse,
                    old.flash_mrna_jsd,
                )
                fd_s = old.flash_s
            else:
                fd, fd_s = flashdeconv(slide, ref, cache, tag)
                row["flash_mrna_rmse"], row["flash_mrna_jsd"] = scores(fd, truth_mrna)
            row["ours_s"], row["flash_s"] = ours_s, fd_s
            rows.append(row)
            print(
                f"{tag:22s} {layout:6s} {depth:6.0f}  ours cell {row['ours_cell_rmse']:.4f}/"
                f"{row['ours_cell_jsd']:.4f} mRNA {row['ours_mrna_rmse']:.4f}/"
                f"{row['ours_mrna_jsd']:.4f}  flash {row['flash_mrna_rmse']:.4f}/"
                f"{row['flash_mrna_jsd']:.4f}  ({ours_s:.0f} s)",
                flush=True,
            )
    return pd.DataFrame(rows)


def summary_table(df: pd.DataFrame) -> str:
    """Per reference: mean ± sd over seeds, and ours' wins / losses against FlashDeconv."""
    cols = [
        ("ours_cell", "ours, cell fractions vs cell truth"),
        ("ours_mrna", "ours, mRNA fractions vs mRNA truth"),
        ("flash_mrna", "FlashDeconv vs mRNA truth"),
    ]
    head = ["reference", "metric"] + [c[1] for c in cols] + ["wins (cell / mRNA) of n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = [(r, g) for r, g in df.groupby("reference", sort=False)] + [("ALL", df)]
    for rname, g in groups:
        for metric in ("rmse", "jsd"):
            cells = []
            for c, _ in cols:
                v = g[f"{c}_{metric}"]
                cells.append(f"{v.mean():.4f} ± {v.std(ddof=1):.4f}")
            flash = g[f"flash_mrna_{metric}"]
            wins_cell = int((g[f"ours_cell_{metric}"] < flash).sum())
            wins_mrna = int((g[f"ours_mrna_{metric}"] < flash).sum())
            lines.append(
                f"| {rname} | {metric.upper()} | "
                + " | ".join(cells)
                + f" | {wins_cell} / {wins_mrna} of {len(g)} |"
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--references", default=",".join([*SYNTHETIC, *REAL]))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--cache", default="/tmp/near_pure_flashdeconv", help="FlashDeconv outputs")
    ap.add_argument("--out", default=None, help="write OUT.csv and OUT.md")
    ap.add_argument(
        "--flash-scores", default=None, help="CSV of an earlier run: its FlashDeconv scores"
    )
    args = ap.parse_args(argv)
    refs = [r for r in args.references.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    t0 = time.perf_counter()
    earlier = pd.read_csv(args.flash_scores) if args.flash_scores else None
    df = run_all(refs, seeds, Path(args.cache) if args.cache else None, earlier)
    table = summary_table(df)
    print()
    print(table)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        out = Path(args.out)
        df.to_csv(out.with_suffix(".csv"), index=False, float_format="%.5f")
        command = "cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python near_pure.py " + (
            " ".join(argv if argv is not None else sys.argv[1:])
        )
        out.with_suffix(".md").write_text(
            "## Near-pure regions: STL NMF vs FlashDeconv\n\n"
            f"Generated by `{command}` (see the script's docstring for the slides). Per "
            "reference: mean ± sd over the seeds; wins = slides where ours is below FlashDeconv "
            "(ours' cell fractions vs cell truth / ours' mRNA fractions vs mRNA truth, against "
            "FlashDeconv's output vs mRNA truth). Rows per slide: "
            f"`{out.with_suffix('.csv').name}`.\n\n" + table + "\n"
        )
    return df


if __name__ == "__main__":
    main()
