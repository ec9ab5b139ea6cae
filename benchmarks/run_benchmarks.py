"""Accuracy and speed benchmark: writes docs/benchmarks.md and docs/bench_*.png.

    python benchmarks/run_benchmarks.py            # everything (peers if `make bench-peers` ran)
    python benchmarks/run_benchmarks.py --quick    # a few slides, small scaling sizes

Accuracy: every method on every slide with ground truth (benchmarks/datasets.py), scored
against the true *cell fractions*. Speed: graph build, inference and training time and peak
memory against the number of spots and of cell types, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(HERE))
warnings.simplefilter("ignore")

PEER_VENVS = {  # method -> venv made by `make bench-peers`
    "FlashDeconv": ("flashdeconv", "flashdeconv"),
    "RCTD": ("rctd", "rctd"),
    # every reference type kept (rctd-py drops types with < 25 reference cells by default)
    "RCTD (cell_min=1)": ("rctd", "rctd", {"RCTD_CELL_MIN": "1"}),
    "cell2location": ("cell2location", "scvi"),
    "Stereoscope": ("stereoscope", "scvi"),
    "Tangram": ("tangram", "tangram"),
    "DestVI": ("destvi", "scvi"),
}


# slow peers (~5-10 min per slide here): run on the slides named by --heavy-peers-on only
HEAVY_PEERS = {"cell2location", "Stereoscope", "DestVI"}


def ours(method, **kw):
    from napari_stlnmf import deconvolve

    def run(slide, reference, key):
        # the paper's circle grid holds non-integer expression (not counts): accepted as such;
        # the option changes nothing on the slides of whole counts
        options = {"allow_non_integer_slide": True, **kw}
        res = deconvolve(slide, reference, cell_type_key=key, method=method, seed=0, **options)
        return res.cell_fractions, res.mrna_fractions, res.info

    return run


def nnls(smooth):
    from napari_stlnmf.baselines import nnls_proportions

    def run(slide, reference, key):
        cell = nnls_proportions(slide, reference, cell_type_key=key, smooth=smooth)
        mrna = nnls_proportions(
            slide, reference, cell_type_key=key, smooth=smooth, fractions="mrna"
        )
        return cell, mrna, {}

    return run


def nnls_norm():
    from nnls_normalised import nnls_normalised

    def run(slide, reference, key):
        cell, mrna = nnls_normalised(slide, reference, cell_type_key=key)
        return cell, mrna, {}

    return run


def peer(name, timeout):
    method, venv, *env = PEER_VENVS[name]
    env = {**os.environ, **(env[0] if env else {})}
    python = HERE / ".venvs" / venv / "bin" / "python"

    def run(slide, reference, key):
        if key is None:
            raise RuntimeError("needs a single-cell reference (none for this slide)")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            slide.write_h5ad(tmp / "slide.h5ad")
            reference.write_h5ad(tmp / "ref.h5ad")
            cmd = [
                str(python),
                str(HERE / "peers" / "run_peer.py"),
                "--method",
                method,
                "--slide",
                str(tmp / "slide.h5ad"),
                "--reference",
                str(tmp / "ref.h5ad"),
                "--cell-type-key",
                key,
                "--out",
                str(tmp / "p.csv"),
                "--seed",
                "0",
            ]
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"timed out after {timeout} s (--peer-timeout)") from None
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
                raise RuntimeError(lines[-1][:200])
            props = pd.read_csv(tmp / "p.csv", index_col=0)
            side = (
                json.loads((tmp / "p.csv.json").read_text())
                if (tmp / "p.csv.json").exists()
                else {}
            )
            return props, props, side  # one output, scored against both truths

    return run if python.exists() else None


def score_slide(est: pd.DataFrame, truth: pd.DataFrame) -> dict:
    from napari_stlnmf.metrics import score

    est = est.reindex(index=truth.index, columns=truth.columns)
    ok = est.notna().all(1).to_numpy()
    e = est.to_numpy()[ok]
    e = e / np.maximum(e.sum(1, keepdims=True), 1e-12)
    return score(e, truth.to_numpy()[ok])


NAN_SCORES = {
    "rmse": np.nan,
    "jsd": np.nan,
    "pearson": np.nan,
    "rel_frobenius": np.nan,
    "rmse_mrna": np.nan,
    "jsd_mrna": np.nan,
    "pearson_mrna": np.nan,
}


def accuracy(
    quick: bool,
    peers: bool,
    peer_timeout: int,
    heavy_on: str = "bundled demo",
    only: str | None = None,
    slides: str | None = None,
):
    """Every method on every slide, scored against true cell fractions and true mRNA fractions.

    ``only`` / ``slides``: regular expressions; methods / slides whose names do not match are
    skipped (their rows are merged from the previous CSV by ``main``).
    """
    import re

    import datasets as bd

    methods = {
        "STL NMF unrolled (trained)": ours("unrolled", train=True),
        "STL NMF unrolled (shipped defaults)": ours("unrolled", train=False),
        "STL NMF classic": ours("classic"),
        "NNLS": nnls(False),
        "NNLS + spatial smoothing": nnls(True),
        "NNLS (normalised)": nnls_norm(),
    }
    if peers:
        for name in PEER_VENVS:
            fn = peer(name, peer_timeout)
            if fn is not None:
                methods[name] = fn
    if only:
        methods = {k: v for k, v in methods.items() if re.search(only, k)}
    rows, maps = [], {}
    for name, slide, reference, key, truth, truth_mrna, note in bd.all_slides(quick):
        if slides and not re.search(slides, name):
            continue
        print(f"== {name}: {slide.n_obs} spots, {truth.shape[1]} types", flush=True)
        for mname, fn in methods.items():
            if mname in HEAVY_PEERS and not name.startswith(heavy_on):
                continue
            t0 = time.perf_counter()
            try:
                cell, mrna, info = fn(slide, reference, key)
                sc = score_slide(cell, truth)
                sc_m = score_slide(mrna, truth_mrna)
                info = info if isinstance(info, dict) else {}
                secs = info.get(
                    "fit_time_s", info.get("seconds", time.perf_counter() - t0)
                )  # peers: the fit, not file I/O
                row = {
                    "slide": name,
                    "method": mname,
                    **sc,
                    "rmse_mrna": sc_m["rmse"],
                    "jsd_mrna": sc_m["jsd"],
                    "pearson_mrna": sc_m["pearson"],
                    "seconds": float(secs),
                    "peak_mb": info.get("peak_rss_mb"),
                    "note": (
                        "no estimate for (set to 0): "
                        + ", ".join(info["cell_types_missing_from_output"])
                        if info.get("cell_types_missing_from_output")
                        else ""
                    ),
                }
                if mname == DEFAULT_OURS:
                    maps[name] = (slide, truth, cell)
            except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, not fatal
                row = {
                    "slide": name,
                    "method": mname,
                    **NAN_SCORES,
                    "seconds": time.perf_counter() - t0,
                    "peak_mb": None,
                    "note": str(exc)[:160],
                }
            print(
                f"   {mname:38s} rmse={row['rmse']:.4f} jsd={row['jsd']:.4f} "
                f"rmse_mrna={row['rmse_mrna']:.4f} "
                f"{row['seconds']:.1f}s {row['note']}",
                flush=True,
            )
            rows.append(row)
            pd.DataFrame(rows).to_csv(
                DOCS / "bench_accuracy.partial.csv", index=False
            )  # survives an interrupted run
    regions = pd.DataFrame()
    want_pdac = not quick and (not slides or re.search(slides, bd.PDAC_NAME))
    if want_pdac and (bd.SHARED / "pdac_a_card").is_dir():
        regions = pdac_regions(methods, bd)
    return pd.DataFrame(rows), maps, regions


def region_rows(est: pd.DataFrame, regions: pd.Series, expected: dict) -> list[dict]:
    """Per pathologist region: mean share of the region's expected types, and the fraction of
    its spots where the expected group has the largest summed share of the groups
    (the four groups plus 'other', the types expected nowhere)."""
    e = est.reindex(regions.index)
    ok = e.notna().all(1) & (e.sum(1) > 0)
    e, reg = e[ok], regions[ok]
    e = e.div(e.sum(1), axis=0)
    share = pd.DataFrame({g: e[list(ts)].sum(1) for g, ts in expected.items()})
    share["other"] = (1.0 - share.sum(1)).clip(lower=0)
    dominant = share.idxmax(1)
    return [
        {
            "region": g,
            "n_spots": int((reg == g).sum()),
            "expected_share": float(share.loc[reg == g, g].mean()),
            "dominant_frac": float((dominant[reg == g] == g).mean()),
        }
        for g in expected
    ]


def pdac_regions(methods: dict, bd) -> pd.DataFrame:
    """PDAC-A: no proportions, pathologist regions; every method's region table."""
    name, slide, sig, regions, note = bd.load_pdac()
    print(f"== {name}: {slide.n_obs} spots, {sig.shape[1]} types ({note})", flush=True)
    rows = []
    for mname, fn in methods.items():
        if mname in HEAVY_PEERS:
            continue
        t0 = time.perf_counter()
        try:
            cell, mrna, _ = fn(slide, sig, None)
            secs = time.perf_counter() - t0
            outs = (("cell", cell), ("mRNA", mrna)) if cell is not mrna else (("single", cell),)
            for quantity, est in outs:
                for r in region_rows(est, regions, bd.PDAC_EXPECTED):
                    rows.append(
                        {"method": mname, "output": quantity, **r, "seconds": secs, "note": ""}
                    )
            note_m = ""
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            note_m = str(exc)[:160]
            rows.append(
                {
                    "method": mname,
                    "output": "",
                    "region": "",
                    "n_spots": 0,
                    "expected_share": np.nan,
                    "dominant_frac": np.nan,
                    "seconds": time.perf_counter() - t0,
                    "note": note_m,
                }
            )
        print(f"   {mname:38s} {time.perf_counter() - t0:.1f}s {note_m}", flush=True)
    out = pd.DataFrame(rows)
    out.insert(0, "slide", name)
    return out


def merge_rows(new: pd.DataFrame, old: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``new`` replace those of ``old`` with the same (slide, method); order
    follows old."""
    if not len(old):
        return new
    if not len(new):
        return old
    key = lambda d: d.slide + "\t" + d.method
    kept = old[~key(old).isin(set(key(new)))]
    out = pd.concat([kept, new], ignore_index=True)
    order = {s: i for i, s in enumerate(pd.concat([old.slide, new.slide]).unique())}
    return out.sort_values("slide", key=lambda c: c.map(order), kind="stable").reset_index(
        drop=True
    )


def scaling(quick: bool, peers: bool = True):
    """Each measurement in a fresh process: ours (inference; training + inference) and
    FlashDeconv."""
    sizes = [1000, 5000, 50_000] if quick else [1000, 5000, 50_000, 100_000, 500_000, 1_000_000]
    jobs = [(n, 20, 2000, "infer") for n in sizes]
    jobs += [(5000, p, 2000, "infer") for p in (5, 50)]
    jobs += [
        (n, 20, 2000, "train") for n in ((5000,) if quick else (1000, 5000, 100_000, 1_000_000))
    ]
    jobs += [(5000, p, 2000, "train") for p in (() if quick else (5, 50))]
    if peers:
        jobs += [(n, 20, 2000, "flashdeconv") for n in sizes]
        jobs += [(5000, p, 2000, "flashdeconv") for p in (5, 50)]
    out = []
    for n, p, m, what in jobs:
        print(f"-- scaling {what} n={n} p={p}", flush=True)
        proc = subprocess.run(
            [sys.executable, str(HERE / "scaling_worker.py"), str(n), str(p), str(m), what],
            capture_output=True,
            text=True,
            timeout=4000,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr[-2000:])
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        print("   ", rec, flush=True)
        out.append(rec)
        pd.DataFrame(out).to_csv(DOCS / "bench_scaling.partial.csv", index=False)
    return pd.DataFrame(out)


def speed_comparison(sc: pd.DataFrame) -> pd.DataFrame:
    """Per (spots, types): our time without and with training next to FlashDeconv's."""

    def pick(what, col):
        d = sc[sc.what == what].set_index(["n_spots", "n_types"])
        return d[col] if col in d else pd.Series(dtype=float)

    out = pd.DataFrame(
        {
            "STL NMF, shipped/saved parameters (s)": pick("infer", "seconds"),
            "STL NMF incl. fine-tuning (s)": pick("train", "seconds"),
            "FlashDeconv (s)": pick("flashdeconv", "seconds"),
            "STL NMF peak (MB)": pick("infer", "peak_rss_mb"),
            "FlashDeconv peak (MB)": pick("flashdeconv", "peak_rss_mb"),
            "FlashDeconv note": pick("flashdeconv", "note"),
        }
    )
    return out.sort_index()


def plots(acc: pd.DataFrame, sc: pd.DataFrame, maps: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figs = {}
    if len(acc):
        cols = [c for c in ("rmse", "rmse_mrna") if c in acc and acc[c].notna().any()]
        n_slides = acc.slide.nunique()
        fig, axes = plt.subplots(
            1,
            len(cols),
            figsize=(7 * len(cols), 0.5 * len(acc) / max(len(cols), 1) + 3),
            sharey=True,
            squeeze=False,
        )
        for ax, col in zip(axes[0], cols):
            piv = acc.pivot_table(index="slide", columns="method", values=col, sort=False)
            piv = piv[
                [m for m in ESTIMATES if m in piv.columns]
                + [m for m in piv.columns if m not in ESTIMATES]
            ]
            palette = plt.get_cmap("tab20").colors  # one colour per method (tab10 repeats after 10)
            piv.plot.barh(
                ax=ax,
                width=0.85,
                legend=False,
                logx=True,
                color=[palette[(2 * i) % 20 + (2 * i) // 20] for i in range(piv.shape[1])],
            )
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(
                f"RMSE vs true {'cell' if col == 'rmse' else 'mRNA'} fractions "
                "(log scale; lower is better)"
            )
            ax.set_ylabel("")
            ax.grid(axis="x", which="both", alpha=0.3)
        axes[0][0].invert_yaxis()
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.suptitle(f"Accuracy on {n_slides} slides with ground truth")
        fig.tight_layout(rect=(0, 0.05, 1, 0.98))
        fig.savefig(DOCS / "bench_accuracy.png", dpi=90)
        plt.close(fig)
        figs["accuracy"] = "bench_accuracy.png"
    if len(sc):
        inf = sc[(sc.what == "infer") & (sc.n_types == 20)].sort_values("n_spots")
        if len(inf) >= 2:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for col, label in (
                ("graph_s", "STL NMF graph build"),
                ("inference_s", "STL NMF inference"),
                ("seconds", "STL NMF total (default: shipped parameters)"),
            ):
                axes[0].loglog(inf.n_spots, inf[col], "o-", label=label)
            for what, label, style in (
                ("train", "STL NMF total incl. fine-tuning (opt-in)", "s--"),
                ("flashdeconv", "FlashDeconv", "k^-"),
            ):
                d = sc[(sc.what == what) & (sc.n_types == 20)].sort_values("n_spots")
                d = d[np.isfinite(d.seconds.astype(float))]
                if len(d):
                    axes[0].loglog(d.n_spots, d.seconds, style, label=label)
                    axes[1].loglog(d.n_spots, d.peak_rss_mb / 1024, style, label=label)
            axes[0].set_xlabel("spots")
            axes[0].set_ylabel("seconds")
            axes[0].legend(fontsize=8)
            axes[0].set_title("time vs spots (20 types, 2,000 genes)")
            axes[1].loglog(
                inf.n_spots, inf.peak_rss_mb / 1024, "o-", label="STL NMF (process peak)"
            )
            axes[1].set_xlabel("spots")
            axes[1].set_ylabel("peak memory (GB)")
            axes[1].legend(fontsize=8)
            axes[1].set_title("memory vs spots")
            fig.tight_layout()
            fig.savefig(DOCS / "bench_scaling.png", dpi=90)
            plt.close(fig)
            figs["scaling"] = "bench_scaling.png"
    maps = {k: v for k, v in maps.items() if k.startswith("sim")}  # the figure shows a sim slide
    if maps:
        from napari_stlnmf.plotting import plot_truth_vs_estimate

        name = next(iter(maps))
        slide, truth, est = maps[name]
        cols = list(truth.columns[:3])
        plot_truth_vs_estimate(slide, truth[cols], est[cols], DOCS / "bench_maps.png", dpi=70)
        figs["maps"] = ("bench_maps.png", name)
    return figs


def growth(sc: pd.DataFrame, col: str) -> float | None:
    d = sc[(sc.what == "infer") & (sc.n_types == 20)].sort_values("n_spots")
    d = d[d.n_spots >= 5000]
    if len(d) < 2 or (d[col] <= 0).any():
        return None
    return float(np.polyfit(np.log(d.n_spots), np.log(d[col]), 1)[0])


# method -> (what its output is, the truth it should be judged on); peers:
# benchmarks/peers/README.md
ESTIMATES = {
    "STL NMF unrolled (trained)": (
        "both: mRNA fractions, and cell fractions = mRNA fractions / mRNA per cell",
        "both (matching output)",
    ),
    "STL NMF unrolled (shipped defaults)": ("both (as above)", "both (matching output)"),
    "STL NMF classic": ("both (as above)", "both (matching output)"),
    "NNLS": ("both (same conversion as STL NMF)", "both (matching output)"),
    "NNLS + spatial smoothing": ("both (same conversion as STL NMF)", "both (matching output)"),
    "NNLS (normalised)": (
        (
            "both: mRNA fractions = NNLS weights on library-size-normalised data and per-type "
            "mean normalised profiles; cell fractions = those / mean counts per cell "
            "(benchmarks/nnls_normalised.py)"
        ),
        "both (matching output)",
    ),
    "FlashDeconv": ("mRNA fractions (approx.)", "mRNA"),
    "RCTD": ("mRNA fractions (full mode)", "mRNA"),
    "RCTD (cell_min=1)": ("mRNA fractions (full mode, every reference type kept)", "mRNA"),
    "cell2location": ("cell fractions (abundance / total)", "cells"),
    "Stereoscope": ("mRNA fractions", "mRNA"),
    "DestVI": ("mRNA fractions", "mRNA"),
    "Tangram": ("cell fractions (cells mode)", "cells"),
}


DEFAULT_OURS = (
    "STL NMF unrolled (shipped defaults)"  # what deconvolve() does unless asked to fine-tune
)
SHORT_NAMES = {DEFAULT_OURS: "STL NMF", "STL NMF unrolled (trained)": "STL NMF fine-tuned"}


def win_summary(acc: pd.DataFrame) -> list[str]:
    """Per slide: the best method on each score, and the best peer judged on its own quantity."""
    out = [
        (
            "**Best per slide** (lowest; `STL NMF` = STL NMF unrolled (shipped defaults), "
            "the default run; ties name it first). 'best peer, own truth' scores each peer "
            "against the quantity it estimates:"
        ),
        "",
        (
            "| slide | RMSE (cells) | JSD (cells) | RMSE (mRNA) | JSD (mRNA) "
            "| STL NMF RMSE cells / mRNA | best peer, own truth: RMSE |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for slide, g in acc.groupby("slide", sort=False):

        def best(col, g=g):
            h = g.dropna(subset=[col])
            h = pd.concat([h[h.method == DEFAULT_OURS], h[h.method != DEFAULT_OURS]])
            if not len(h):
                return "–"
            r = h.iloc[int(np.argmin(h[col].to_numpy()))]
            return f"{SHORT_NAMES.get(r.method, r.method)} {r[col]:.4f}"

        t = g[g.method == DEFAULT_OURS]
        ours_s = f"{t.rmse.iloc[0]:.4f} / {t.rmse_mrna.iloc[0]:.4f}" if len(t) else "–"
        own = []
        for _, r in g.iterrows():
            judge = ESTIMATES.get(r.method, ("", ""))[1]
            value = r.rmse_mrna if judge == "mRNA" else r.rmse
            if judge in ("mRNA", "cells") and np.isfinite(value):
                own.append((value, r.method, judge))
        own_s = "–" if not own else "{1} {0:.4f} ({2})".format(*min(own))
        out.append(
            f"| {slide} | {best('rmse')} | {best('jsd')} | {best('rmse_mrna')} "
            f"| {best('jsd_mrna')} | {ours_s} | {own_s} |"
        )
    return out + [""]


def _fmt(v, d=4):
    return "–" if v is None or not np.isfinite(v) else f"{v:.{d}f}"


def real_gaps(real: pd.DataFrame) -> list[str]:
    """Per real set and truth: the best method, our default run, the gap, who beats us."""
    out = [
        (
            "| set | truth | best RMSE | STL NMF (default) RMSE | gap | rank of STL NMF "
            "| methods with lower RMSE than STL NMF | best JSD | STL NMF JSD |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for slide, g in real.groupby("slide", sort=False):
        for truth, col, jcol in (("cells", "rmse", "jsd"), ("mRNA", "rmse_mrna", "jsd_mrna")):
            h = g.dropna(subset=[col]).sort_values(col)
            t = h[h.method == DEFAULT_OURS]
            if not len(h) or not len(t):
                continue
            ours_v, best = float(t[col].iloc[0]), h.iloc[0]
            rank = int((h[col] < ours_v).sum()) + 1
            better = [
                f"{SHORT_NAMES.get(m, m)} {v:.4f}"
                for m, v in zip(h.method, h[col])
                if v < ours_v and m != DEFAULT_OURS
            ]
            hj = g.dropna(subset=[jcol]).sort_values(jcol).iloc[0]
            out.append(
                f"| {slide} | {truth} | {SHORT_NAMES.get(best.method, best.method)} "
                f"{best[col]:.4f} | {ours_v:.4f} | "
                + (f"+{100 * (ours_v / best[col] - 1):.0f} %" if rank > 1 else "best")
                + f" | {rank} of {len(h)} | {'; '.join(better) or 'none'} "
                f"| {SHORT_NAMES.get(hj.method, hj.method)} {hj[jcol]:.4f} "
                f"| {_fmt(float(t[jcol].iloc[0]))} |"
            )
    return out + [""]


def region_summary(regions: pd.DataFrame) -> list[str]:
    regions = regions.fillna({"region": "", "output": "", "note": ""})  # as read back from CSV
    ok = regions[regions.region.astype(str) != ""]
    order = list(dict.fromkeys(ok.region))
    n = ok.groupby("region").n_spots.first()
    out = [
        "| method | output | "
        + " | ".join(f"{r} ({n[r]} spots)" for r in order)
        + " | mean over regions |",
        "|---|---|" + "---|" * (len(order) + 1),
    ]
    for (m, o), g in ok.groupby(["method", "output"], sort=False):
        g = g.set_index("region")
        cells = [
            f"{g.expected_share[r]:.2f} / {100 * g.dominant_frac[r]:.0f} %" if r in g.index else "–"
            for r in order
        ]
        out.append(
            f"| {m} | {o} | " + " | ".join(cells) + f" | {g.expected_share.mean():.2f} / "
            f"{100 * g.dominant_frac.mean():.0f} % |"
        )
    failed = regions[regions.region.astype(str) == ""]
    out.append("")
    for note, g in failed.groupby("note", sort=False):
        out.append(f"Did not run on this slide: {', '.join(g.method)} ({note}).")
    return out + [""]


def real_section(real: pd.DataFrame, regions: pd.DataFrame) -> list[str]:
    """The page's lead: the real-tissue sets (hand-written context from
    benchmarks/real_tissue.md, generated tables, ablations, hand-written reading)."""
    if not len(real) and not len(regions):
        return []
    lines = ["## Real tissue", ""]
    for name in ("real_tissue.md",):
        path = HERE / name
        if path.exists():
            lines += [path.read_text().strip(), ""]
    if len(real):
        lines += [
            "### How far we are from the best",
            "",
            (
                "`STL NMF` = `deconvolve(slide, reference, cell_type_key='cell_type', seed=0)`, "
                "the default run; 'cells' scores each method's cell fractions against the true "
                "cell fractions, 'mRNA' its mRNA fractions against the true mRNA fractions (a peer "
                "has one output, scored against both; RCTD and FlashDeconv estimate mRNA "
                "fractions, so their 'cells' row is not their own quantity). Gap = our RMSE / the "
                "best RMSE − 1."
            ),
            "",
        ]
        lines += real_gaps(real)
        for slide, grp in real.groupby("slide", sort=False):
            lines += [
                f"### {slide}",
                "",
                (
                    "| method | RMSE (cells) | JSD (cells) | Pearson (cells) | RMSE (mRNA) "
                    "| JSD (mRNA) | Pearson (mRNA) | time (s) | note |"
                ),
                "|---|---|---|---|---|---|---|---|---|",
            ]
            best = {c: grp[c].min() for c in ("rmse", "jsd", "rmse_mrna", "jsd_mrna")}
            bold = lambda r, c, best=best: f"**{r[c]:.4f}**" if r[c] == best[c] else _fmt(r[c])
            for _, r in grp.sort_values("rmse", na_position="last").iterrows():
                lines.append(
                    f"| {r.method} | {bold(r, 'rmse')} | {bold(r, 'jsd')} | {_fmt(r.pearson, 3)} "
                    f"| {bold(r, 'rmse_mrna')} | {bold(r, 'jsd_mrna')} "
                    f"| {_fmt(r.get('pearson_mrna', np.nan), 3)} | {r.seconds:.1f} | {r.note} |"
                )
            lines.append("")
    if len(regions):
        lines += [
            f"### {regions.slide.iloc[0]}",
            "",
            (
                "No proportions exist for this slide, only the pathologist's region of each spot. "
                "Per region: the mean share of the types expected there / the fraction of the "
                "region's spots where that group has the largest summed share among the four "
                "groups and 'other'. Groups (from the signature's type names): **Duct "
                "Epithelium** = the four Ductal_* types; **Pancreatic** = Acinar_cells; "
                "**Cancer** = Cancer_clone_A + Cancer_clone_B; **Stroma** = Fibroblasts, "
                "Endothelial_cells and the immune types (Macrophages_A/B, Mast_cells, Monocytes, "
                "T_cells_&_NK_cells, mDCs_A/B, pDCs); 'other' = Endocrine_cells, RBCs, "
                "Tuft_cells. Reference = the genes x 20 types mean-count signature (no single "
                "cells, so the peers, which need them, do not run here). 'cell' and 'mRNA' are "
                "the method's cell and mRNA fractions: acinar cells carry ~3-4x the mRNA of the "
                "other types in this signature, so they differ most in 'Pancreatic'. Higher is "
                "better; the share is a qualitative check (a region is not pure: stroma lies "
                "between ducts, and cancer regions hold stroma)."
            ),
            "",
        ]
        lines += region_summary(regions)
    abl = DOCS / "bench_real_ablations.md"  # written by benchmarks/real_tissue_ablations.py
    if abl.exists():
        lines += [
            "### Ablations",
            "",
            (
                "Options of `deconvolve` on the two sets with truth "
                "(`benchmarks/real_tissue_ablations.py`, the table of the first real-tissue "
                "measurements, re-run here)."
            ),
            "",
            abl.read_text().strip(),
            "",
        ]
    reading = HERE / "analysis_real.md"  # hand-written reading of the real-tissue results
    if reading.exists():
        lines += [reading.read_text().strip(), ""]
    return lines


def write_page(acc, sc, figs, args, started, regions=None):
    import shlex

    from datasets import REAL_PREFIX

    real = acc[acc.slide.str.startswith(REAL_PREFIX)] if len(acc) else acc
    acc = acc[~acc.slide.str.startswith(REAL_PREFIX)] if len(acc) else acc
    command = " ".join(["python benchmarks/run_benchmarks.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` / `{command}` on "
        f"{time.strftime('%Y-%m-%d', time.gmtime(started))}: {platform.machine()}, "
        f"{os.cpu_count()} cores, "
        f"torch threads = {os.environ.get('OMP_NUM_THREADS', 'default')}; "
        + (
            f"run time {time.time() - started:.0f} s"
            if (args.accuracy or args.scaling)
            else (
                "page rebuilt from docs/bench_accuracy.csv and docs/bench_scaling.csv "
                "(`--no-accuracy --no-scaling --reuse`)"
            )
        )
        + (
            "; this run re-ran only "
            + " on ".join(
                f"the {what} matching `{rx}`"
                for what, rx in (("methods", args.methods), ("slides", args.slides))
                if rx
            )
            + ", the other rows come from earlier runs (docs/bench_accuracy.csv)."
            if args.accuracy and (args.methods or args.slides)
            else "."
        ),
        "",
        (
            "RMSE over all spots and types, JSD = mean per-spot Jensen–Shannon divergence "
            "(natural log), Pearson = mean over types, rel. Frobenius = ||V̂ − V|| / ||V|| "
            "(the original paper's score). 'STL NMF unrolled (shipped defaults)' is what "
            "`deconvolve` does by default: the parameters shipped with the package, learned by "
            "unrolling on slides simulated from many references. '(trained)' fine-tunes them "
            "first (`train=True`) on slides simulated on each slide's own layout from its "
            "reference (never from the slide's truth)."
        ),
        "",
    ]
    lines += real_section(real, regions if regions is not None else pd.DataFrame())
    if len(acc):
        lines += [
            "## Simulated slides: accuracy",
            "",
            (
                "Two truths, because methods estimate different things: **cell fractions** "
                "(share of each spot's cells) and **mRNA fractions** (share of each spot's "
                "transcripts). They differ where cell types differ in mRNA per cell (the "
                "synthetic references here differ up to ~4x). Every method is scored against "
                "both: STL NMF and NNLS report both quantities (mRNA fractions, and cell "
                "fractions = mRNA fractions / mRNA per cell, renormalised), and are scored with "
                "the matching one; a peer's single output is scored against both truths, so each "
                "peer can be judged against the quantity it estimates (table below). The paper "
                "grids' truth is the mixing weight of per-type mean profiles per cell, i.e. cell "
                "fractions; their mRNA truth weights it by the profiles' totals."
            ),
            "",
            "| method | output | judge it on |",
            "|---|---|---|",
        ]
        present = [m for m in ESTIMATES if m in set(acc.method)] + [
            m for m in acc.method.unique() if m not in ESTIMATES
        ]
        lines += [
            f"| {m} | {ESTIMATES.get(m, ('', ''))[0]} | {ESTIMATES.get(m, ('', ''))[1]} |"
            for m in present
        ]
        lines += [
            "",
            (
                "Peers run with their documented defaults except where recorded in "
                "benchmarks/peers/README.md (cell2location 250 + 10,000 epochs, Stereoscope "
                "~30,000 steps, DestVI 300 + 2,000 epochs; being slow here (5-45 min per slide), "
                "these three run on the demo slide only). Peers need a single-cell reference: "
                "they have no score on the signature-only slide."
            ),
            "",
        ]
        lines += win_summary(acc)
        analysis = HERE / "analysis.md"  # hand-written reading of the results, kept across runs
        if analysis.exists():
            lines += [analysis.read_text().strip(), ""]
        if "accuracy" in figs:
            lines += [f"![RMSE per method]({figs['accuracy']})", ""]
        for slide, grp in acc.groupby("slide", sort=False):
            lines += [
                f"### {slide}",
                "",
                (
                    "| method | RMSE (cells) | JSD (cells) | Pearson (cells) "
                    "| rel. Frobenius (cells) | RMSE (mRNA) | JSD (mRNA) | time (s) | note |"
                ),
                "|---|---|---|---|---|---|---|---|---|",
            ]
            best = {c: grp[c].min() for c in ("rmse", "jsd", "rmse_mrna", "jsd_mrna")}
            bold = lambda r, c, best=best: f"**{r[c]:.4f}**" if r[c] == best[c] else f"{r[c]:.4f}"
            for _, r in grp.sort_values("rmse", na_position="last").iterrows():
                lines.append(
                    f"| {r.method} | {bold(r, 'rmse')} | {bold(r, 'jsd')} | {r.pearson:.3f} "
                    f"| {r.rel_frobenius:.3f} | "
                    f"{bold(r, 'rmse_mrna')} | {bold(r, 'jsd_mrna')} | {r.seconds:.1f} | {r.note} |"
                )
            lines.append("")
        if "maps" in figs:
            lines += [
                f"Truth (left) vs STL NMF (right) on *{figs['maps'][1]}*:",
                "",
                f"![maps]({figs['maps'][0]})",
                "",
            ]
        elif (DOCS / "bench_maps.png").exists():
            lines += [
                "Truth (left) vs STL NMF (right) on one simulated slide:",
                "",
                "![maps](bench_maps.png)",
                "",
            ]
    if len(sc):
        lines += [
            "## Speed and memory",
            "",
            (
                "Each measurement is a fresh process on the same simulated input (sparse counts: "
                "150 reads per bin above 100k spots, like Visium HD; 2,000 per spot below; square "
                "8 µm bins; 2,000 genes). 'STL NMF' = `deconvolve()` as it runs by default, with "
                "the shipped (or saved) parameters: preparing + graph + platform-effect and noise "
                "pre-fits + inference. 'incl. training' is the opt-in fine-tuning (`train=True`) "
                "on simulated crops (≤1,500 spots each, so its cost does not grow with the "
                "slide). FlashDeconv: its own fit time (`fit_time_s`, file reading excluded) in "
                "its venv; its memory is watched and it is stopped above the cap "
                "(`STLNMF_BENCH_MEM_CAP_GB`, default 20 GB)."
            ),
            "",
        ]
        cmp_ = speed_comparison(sc)
        if len(cmp_):
            lines += [
                (
                    "| spots | types | STL NMF (s) | STL NMF incl. fine-tuning (s) "
                    "| FlashDeconv (s) | STL NMF peak (MB) | FlashDeconv peak (MB) | note |"
                ),
                "|---|---|---|---|---|---|---|---|",
            ]
            f = lambda v, d=1: (
                "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:,.{d}f}"
            )
            for (n, p), r in cmp_.iterrows():
                lines.append(
                    f"| {n:,} | {p} | {f(r.iloc[0])} | {f(r.iloc[1])} | {f(r.iloc[2])} "
                    f"| {f(r.iloc[3], 0)} | "
                    f"{f(r.iloc[4], 0)} | {r.iloc[5] if isinstance(r.iloc[5], str) else ''} |"
                )
            lines += [
                "",
                (
                    "Stages of our runs (peak RSS includes Python, torch and the simulated input; "
                    "`RSS before` is the process before `deconvolve`):"
                ),
                "",
            ]
        lines += [
            (
                "| what | spots | types | genes used | graph (s) | platform & noise (s) "
                "| training (s) | inference (s) | total (s) | peak RSS (MB) | RSS before (MB) |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in sc[sc.what != "flashdeconv"].iterrows():
            prefit = getattr(r, "platform_s", float("nan"))
            prefit = f"{prefit:.2f}" if np.isfinite(prefit) else "–"
            lines.append(
                f"| {r.what} | {r.n_spots:,} | {r.n_types} | {int(r.n_genes_used)} "
                f"| {r.graph_s:.2f} | {prefit} | {r.training_s:.1f} | "
                f"{r.inference_s:.2f} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} "
                f"| {r.rss_before_mb:.0f} |"
            )
        lines.append("")
        for col, label in (
            ("seconds", "total time"),
            ("inference_s", "inference"),
            ("graph_s", "graph build"),
        ):
            g = growth(sc, col)
            if g is not None:
                lines.append(f"- fitted growth of {label} with spots (5k and up): ∝ n^{g:.2f}")
        lines.append("")
        if "scaling" in figs:
            lines += [f"![scaling]({figs['scaling']})", ""]
    lines += separate_sections()
    (DOCS / "benchmarks.md").write_text("\n".join(lines) + "\n")


# benchmarks run on their own (a display, a cluster) write a section of the page; kept as is
SEPARATE_SECTIONS = (
    "bench_near_pure.md",
    "bench_napari_hd.md",
    "bench_missing_type.md",
    "bench_uncertainty.md",
    "bench_batch.md",
    "bench_tiled.md",
)


def separate_sections() -> list[str]:
    """The sections the separately run benchmarks wrote (``docs/bench_*.md``), in order."""
    lines = []
    for name in SEPARATE_SECTIONS:
        path = DOCS / name
        if path.exists():
            lines += [path.read_text().strip(), ""]
    return lines


def _cached(name, args) -> pd.DataFrame:
    path = DOCS / name
    return (
        pd.read_csv(path).fillna({"note": ""}) if args.reuse and path.exists() else pd.DataFrame()
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false")
    ap.add_argument("--peer-timeout", type=int, default=1800)
    ap.add_argument(
        "--heavy-peers-on",
        default="bundled demo",
        help="slide-name prefix on which cell2location/Stereoscope run",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="reuse docs/bench_*.csv of sections not re-run"
    )
    ap.add_argument(
        "--methods",
        default=None,
        help=(
            "regex: run only matching methods; the other methods' rows are kept from "
            "docs/bench_accuracy.csv"
        ),
    )
    ap.add_argument(
        "--slides",
        default=None,
        help=(
            "regex: run only on matching slides; the other slides' rows are kept from "
            "docs/bench_accuracy.csv"
        ),
    )
    args = ap.parse_args()
    started = time.time()
    DOCS.mkdir(exist_ok=True)
    regions_csv = DOCS / "bench_regions.csv"
    if args.accuracy:
        acc, maps, regions = accuracy(
            args.quick,
            args.peers,
            args.peer_timeout,
            args.heavy_peers_on,
            args.methods,
            args.slides,
        )
        if (args.methods or args.slides) and (DOCS / "bench_accuracy.csv").exists():
            acc = merge_rows(acc, pd.read_csv(DOCS / "bench_accuracy.csv").fillna({"note": ""}))
        if (args.methods or args.slides) and regions_csv.exists():
            old = pd.read_csv(regions_csv).fillna({"note": "", "output": "", "region": ""})
            if len(regions):  # PDAC re-run for these methods: their rows replace the old ones
                old = old[~old.method.isin(set(regions.method))]
            regions = pd.concat([old, regions], ignore_index=True)
    else:
        acc, maps = _cached("bench_accuracy.csv", args), {}
        regions = _cached("bench_regions.csv", args)
    if len(acc):
        acc.to_csv(DOCS / "bench_accuracy.csv", index=False)
    if len(regions):
        regions.to_csv(regions_csv, index=False)
    sc = scaling(args.quick, args.peers) if args.scaling else _cached("bench_scaling.csv", args)
    if len(sc):
        sc.to_csv(DOCS / "bench_scaling.csv", index=False)
    figs = plots(acc, sc, maps)
    write_page(acc, sc, figs, args, started, regions)
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
