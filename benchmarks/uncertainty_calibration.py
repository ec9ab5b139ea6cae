"""Calibration of the uncertainty intervals (issue 20, must-have 1) on slides with truth.

Run (single thread; ~5-10 min)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/uncertainty_calibration.py \
        [--draws 30] [--quick] [--json docs/bench_uncertainty.json]

Each slide is deconvolved once with ``uncertainty=True``; the bootstrap draws are kept (by
wrapping :func:`napari_stlnmf.uncertainty.interval_from_draws`) so that the intervals can be
formed for any model error ``τ``. Coverage = share of the (spot, type) entries whose true cell
fraction lies inside the interval, counted over the entries where the type is present in the
truth or in the estimate (a type absent from both is inside any interval that contains the
estimate); also given over all entries and over those whose truth is not zero.

1. **Training** slides (simulated, seeds 0-5, kinds ``smooth`` and ``regions``, 6-10 types,
   1,000-10,000 counts per spot): the bootstrap alone (τ = 0), then the one ``τ`` whose pooled
   coverage (mean over the training slides) is nearest the stated 50, 80 and 90 % (least
   squares over the three): :data:`napari_stlnmf.uncertainty.MODEL_SD`.
2. **Held out**: other seeds and kinds (``gradient``, ``near_pure``), a platform effect,
   shallow 16 µm bins of 1-2 cells, the bundled demo; and the real sets ``seqfish_ob`` and
   ``osmfish_ss`` (when ``../shared/data`` holds them): coverage with the learnt ``τ``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import napari_stlnmf.uncertainty as unc_module
from napari_stlnmf import deconvolve

KEY = "cell_type"
LEVELS = (0.5, 0.8, 0.9)
TAUS = np.round(np.arange(0.0, 0.2001, 0.002), 4)


def _split(full: ad.AnnData, seed: int):
    rng = np.random.default_rng(seed)
    half = np.zeros(full.n_obs, dtype=bool)
    for t in pd.unique(full.obs[KEY]):
        idx = np.flatnonzero((full.obs[KEY] == t).to_numpy())
        half[rng.permutation(idx)[: idx.size // 2]] = True
    return full[half].copy(), full[~half].copy()


def simulated(seed, kind, n_types, depth, *, layout="hex", mean_cells=8.0, platform=0.0):
    from napari_stlnmf.datasets import hex_layout, make_reference
    from napari_stlnmf.preprocess import build_reference
    from napari_stlnmf.simulate import simulate_slide

    full = make_reference(
        n_types=n_types, n_genes=max(600, 30 * n_types), cells_per_type=120, seed=seed
    )
    reference, cells = _split(full, seed)
    if layout == "hex":
        xy = hex_layout(30, 30)
    else:  # 16 µm square bins
        r, c = np.meshgrid(np.arange(25), np.arange(25), indexing="ij")
        xy = np.column_stack([c.ravel() * 16.0, r.ravel() * 16.0])
    cells_ref = build_reference(cells, cell_type_key=KEY)
    sim = simulate_slide(
        xy, cells_ref, kind=kind, mean_cells=mean_cells, platform_sigma=platform,
        library_sizes=np.full(10, float(depth)), seed=1000 + seed,
    )  # fmt: skip
    slide = ad.AnnData(
        X=sp.csr_matrix(sim.counts),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=full.var_names),
    )
    slide.obsm["spatial"] = xy
    types = cells_ref.cell_types
    truth = pd.DataFrame(sim.cell_fractions, index=slide.obs_names, columns=types)
    truth_mrna = pd.DataFrame(sim.mrna_fractions, index=slide.obs_names, columns=types)
    name = (
        f"sim seed {seed}, {n_types} types, {kind}, {depth} counts"
        + (f", {mean_cells:g} cells/spot" if mean_cells != 8.0 else "")
        + (f", platform σ {platform}" if platform else "")
        + (", 16 µm bins" if layout != "hex" else "")
    )
    return name, slide, reference, truth, truth_mrna


TRAIN = [
    (0, "smooth", 6, 3000),
    (1, "regions", 8, 1000),
    (2, "smooth", 10, 10000),
    (3, "regions", 6, 3000),
    (4, "smooth", 8, 1000),
    (5, "regions", 10, 10000),
]
HELD_OUT = [
    (10, "gradient", 8, 3000, {}),
    (11, "near_pure", 6, 2000, {}),
    (12, "smooth", 12, 5000, {"platform": 0.3}),
    (13, "regions", 10, 300, {"layout": "bins", "mean_cells": 1.5, "platform": 0.3}),
]


def _capture_run(slide, reference, draws, seed=0, fractions="cell"):
    """Deconvolve with uncertainty; return the result and the (raw, reported, draws) arrays of
    its (only) library, each spots x types over the fitted spots."""
    captured = {}
    original = unc_module.interval_from_draws

    def keep(point, d, level, model_sd=0.0):
        captured.update(point=point, draws=d)
        return original(point, d, level, model_sd)

    unc_module.interval_from_draws = keep
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            res = deconvolve(
                slide, reference, cell_type_key=KEY, seed=seed, uncertainty=True,
                uncertainty_draws=draws, fractions=fractions,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
    finally:
        unc_module.interval_from_draws = original
    return res, captured, seconds


def coverage_table(res, captured, truth: pd.DataFrame) -> dict:
    """Per level and τ: coverage over the entries present in truth or estimate, over all entries
    and over entries with truth > 0, and the mean width over the first."""
    kept = res.qc.to_numpy() == "ok"
    t = truth.loc[res.proportions.index[kept], res.proportions.columns].to_numpy()
    point, draws = captured["point"], captured["draws"]
    present = (t > 0) | (point > 0)
    out = {}
    for level in LEVELS:
        rows = []
        for tau in TAUS:
            lo, hi = unc_module.interval_from_draws(point, draws, level, tau)
            inside = (lo <= t + 1e-9) & (t <= hi + 1e-9)
            rows.append(
                (
                    float(inside[present].mean()),
                    float(inside.mean()),
                    float(inside[t > 0].mean()),
                    float((hi - lo)[present].mean()),
                )
            )
        out[level] = np.array(rows)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="2 training, 2 held-out slides")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--fractions", choices=("cell", "mrna"), default="cell",
        help="calibrate the cell fractions (default) or the mRNA fractions (fractions='mrna')",
    )  # fmt: skip
    parser.add_argument("--md", type=Path, default=None, help="write the page section here")
    parser.add_argument(
        "--from-json", type=Path, nargs="+", default=None,
        help="re-render the page from --json files (cell and mRNA runs)",
    )  # fmt: skip
    parser.add_argument("--dump", type=Path, default=None, help="folder: draws and truth (npz)")
    a = parser.parse_args(argv)
    if a.from_json:
        _write_page([json.loads(f.read_text()) for f in a.from_json], a.md)
        return 0
    train = TRAIN[:2] if a.quick else TRAIN
    held = HELD_OUT[:2] if a.quick else HELD_OUT

    slides = []
    for seed, kind, k, depth in train:
        slides.append(("train", *simulated(seed, kind, k, depth)))
    for seed, kind, k, depth, extra in held:
        slides.append(("held out", *simulated(seed, kind, k, depth, **extra)))
    from napari_stlnmf.datasets import TRUTH_KEY, load_demo

    demo_slide, demo_ref = load_demo()
    slides.append(("held out", "bundled demo (836 spots, 8 types)", demo_slide, demo_ref,
                   pd.DataFrame(demo_slide.obsm[TRUTH_KEY]),
                   pd.DataFrame(demo_slide.obsm["true_mrna_fractions"])))  # fmt: skip
    if not a.quick:
        import datasets as bd

        for real in bd.real_tissue():
            name, slide, ref, _key, truth, truth_mrna, _note = real
            slides.append(("real", name, slide, ref, truth, truth_mrna))

    tables = []
    for group, name, slide, reference, truth_cell, truth_mrna in slides:
        truth = truth_cell if a.fractions == "cell" else truth_mrna
        res, captured, seconds = _capture_run(slide, reference, a.draws, fractions=a.fractions)
        cov = coverage_table(res, captured, truth)
        if a.dump:
            a.dump.mkdir(parents=True, exist_ok=True)
            kept = res.qc.to_numpy() == "ok"
            t = truth.loc[res.proportions.index[kept], res.proportions.columns].to_numpy()
            np.savez_compressed(
                a.dump / f"{len(tables):02d}.npz", truth=t, group=group, name=name,
                cells=res.info.get("cells_per_spot") or np.nan, **captured,
            )  # fmt: skip
        rmse = float(
            np.sqrt(np.nanmean((res.proportions - truth[res.proportions.columns]).to_numpy() ** 2))
        )
        tables.append((group, name, cov, seconds, rmse, int(slide.n_obs)))
        print(f"{group:8s} {name}: {seconds:.1f} s, rmse {rmse:.3f}, bootstrap-only 90 % "
              f"coverage {cov[0.9][0, 0]:.3f}", flush=True)  # fmt: skip

    error = np.zeros(TAUS.size)
    for level in LEVELS:
        pooled = np.mean([cov[level][:, 0] for g, _, cov, *_ in tables if g == "train"], axis=0)
        error += (pooled - level) ** 2
    best = int(np.argmin(error))
    tau = float(TAUS[best])
    print(f"\nlearnt MODEL_SD[{a.fractions!r}] = {tau} (in use: {unc_module.MODEL_SD})")

    summary = []
    for group, name, cov, seconds, rmse, n in tables:
        for level in LEVELS:
            cal, cal_all, cal_pos, width = cov[level][best]
            summary.append({
                "slide": name, "set": group, "level": level, "raw": float(cov[level][0, 0]),
                "calibrated": cal, "calibrated_all": cal_all, "calibrated_truth_positive": cal_pos,
                "width": width, "seconds": seconds, "rmse": rmse, "n_spots": n,
            })  # fmt: skip
    result = {"model_sd": tau, "draws": a.draws, "fractions": a.fractions, "rows": summary}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    _write_page(result, a.md)
    return 0


def _row(label, group, level, rows) -> str:
    keys = ("raw", "calibrated", "calibrated_all", "calibrated_truth_positive", "width")
    mean = {k: np.mean([r[k] for r in rows]) for k in keys}
    return (
        f"| {label} | {group} | {level:.0%} | {mean['raw']:.3f} | **{mean['calibrated']:.3f}** | "
        f"{mean['calibrated_all']:.3f} | {mean['calibrated_truth_positive']:.3f} | "
        f"{mean['width']:.3f} |"
    )


_WHAT = {"cell": "cell fraction", "mrna": "mRNA fraction"}


def _tables(result: dict, *, every: bool) -> list[str]:
    rows = result["rows"]
    head = [
        "| slide | set | stated | bootstrap only | calibrated | all entries | truth > 0 | width |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    out = list(head)
    for group in ("train", "held out", "real"):
        for level in LEVELS:
            sel = [r for r in rows if r["set"] == group and r["level"] == level]
            if sel:
                out.append(_row(f"mean of {len(sel)} slides", group, level, sel))
    if every:
        out += ["", "Every slide:", "", *head]
        out += [_row(r["slide"], r["set"], r["level"], [r]) for r in rows]
    return out


def _write_page(results: list[dict] | dict, md: Path | None) -> None:
    """The calibration tables (means per set, then every slide for the cell fractions), printed
    and, with ``md``, written as the section ``run_benchmarks.py`` appends to benchmarks.md."""
    results = [results] if isinstance(results, dict) else results
    results = sorted(results, key=lambda r: r.get("fractions", "cell") != "cell")
    lines = [
        "## Uncertainty intervals: calibration",
        "",
        (
            "*Written by `benchmarks/uncertainty_calibration.py` (one thread, about 3 min per "
            "run; appended here by `run_benchmarks.py`):* "
            "`OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/uncertainty_calibration.py "
            "--json docs/bench_uncertainty.json`, the same with `--fractions mrna --json "
            "docs/bench_uncertainty_mrna.json`, then `--from-json docs/bench_uncertainty.json "
            "docs/bench_uncertainty_mrna.json --md docs/bench_uncertainty.md`. "
            f"`deconvolve(..., uncertainty=True)` with {results[0].get('draws', 30)} draws, seed "
            "0. Coverage = share of (spot, type) entries whose **true** proportion lies inside "
            "the interval, over the entries where the type is present in the truth or in the "
            "estimate (a type absent from both is inside every interval, which contains the "
            "estimate); 'all entries' counts those too, 'truth > 0' only entries whose truth is "
            "not zero. 'bootstrap only': the draws' spread alone (τ = 0); 'calibrated': with "
            "the model error τ learnt on the six training slides (least squares over the three "
            "levels; `napari_stlnmf.uncertainty.MODEL_SD`). Training and held-out slides are "
            "simulated from one half of a reference's cells, fitted with the other half; held "
            "out: other seeds, kinds (gradient, near-pure), a platform effect, 16 µm bins of 1-2 "
            "cells at 300 counts, the bundled demo. Width: mean over the counted entries."
        ),
        "",
    ]
    for result in results:
        fractions = result.get("fractions", "cell")
        title = "Cell fractions (the default)" if fractions == "cell" else (
            "mRNA fractions (`fractions='mrna'`)"
        )  # fmt: skip
        lines += [
            f"### {title}: τ = {result['model_sd']:g}",
            "",
            f"Truth: the true {_WHAT[fractions]}s.",
            "",
            *_tables(result, every=fractions == "cell"),
            "",
        ]
    lines += [
        (
            "On the real sets the intervals cover the truth far less often than stated: their "
            "errors (cell RMSE 0.08 and 0.11 against 0.03-0.045 on the simulations) come from "
            "what the simulations do not hold (cell states and sizes unlike the reference's, "
            "segmentation), which one τ learnt on simulations cannot know. Read a real slide's "
            "intervals as the uncertainty the model admits, a lower bound on the real one."
        ),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if md is not None:
        md.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
