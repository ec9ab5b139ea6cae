"""Which pipeline step costs accuracy on real tissue, and why (public API only).

Run (single thread, ~2-4 min)::

    cd /work/wt-accuracy && OMP_NUM_THREADS=1 PYTHONPATH=src \
        /work/main/.venv/bin/python benchmarks/real_tissue_diagnosis.py [--sections a,b] [--json F]

Sections:

- ``options``: RMSE (cell / mRNA fractions) of ``deconvolve`` options on seqfish_ob and osmfish_ss,
  with the run's cells per spot, φ and threshold, and per-type mean estimate against the truth.
- ``noise``: the cells-per-spot estimate taken apart: φ of single reference cells, φ of the real
  spots (on the quick fit, and on the TRUE mRNA fractions), φ of pseudo-spots summed from
  held-out reference cells with the spots' true cell counts, and the library-size estimate.
- ``content``: the reference's mRNA per cell against the cells' mRNA inside the spots (truth).
- ``pdac``: per-region dominant type of pdac_a_card (cell and mRNA fractions).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stlnmf import deconvolve
from napari_stlnmf.baselines import nnls_proportions
from napari_stlnmf.calibration import (
    estimate_noise,
    fit_platform_effect,
    quick_fit,
    reference_overdispersion,
)
from napari_stlnmf.model import NO_CELL_SMOOTHING, UnrolledNMF
from napari_stlnmf.pipeline import default_params_path, shipped_refinement_model
from napari_stlnmf.preprocess import build_reference, prepare

SHARED = Path(
    os.environ.get("STLNMF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
REAL_SETS = ("seqfish_ob", "osmfish_ss")


def load_set(name: str) -> dict:
    """Slide (AnnData), reference (AnnData of single cells) and truths of a shared real set."""
    folder = SHARED / name
    counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
    coords = pd.read_csv(folder / "coords.csv", index_col=0).loc[counts.index]
    slide = ad.AnnData(
        X=sp.csr_matrix(counts.to_numpy(np.float32)),
        obs=pd.DataFrame(index=counts.index.astype(str)),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    slide.obsm["spatial"] = coords[["x", "y"]].to_numpy(np.float64)
    out = {"name": name, "slide": slide}
    if (folder / "sc_counts.csv.gz").exists():
        sc = pd.read_csv(folder / "sc_counts.csv.gz", index_col=0)
        labels = pd.read_csv(folder / "sc_labels.csv", index_col=0).loc[sc.index]
        ref = ad.AnnData(
            X=sp.csr_matrix(sc.to_numpy(np.float32)),
            obs=pd.DataFrame({"cell_type": labels["cell_type"].astype(str).to_numpy()},
                             index=sc.index.astype(str)),
            var=pd.DataFrame(index=sc.columns.astype(str)),
        )  # fmt: skip
        out["reference"], out["key"] = ref, "cell_type"
    else:
        sig = pd.read_csv(folder / "reference_signature.csv", index_col=0)
        out["reference"], out["key"] = sig, None
    for what in ("truth_proportions", "truth_mrna_fractions", "truth_cellcounts"):
        if (folder / f"{what}.csv").exists():
            out[what] = pd.read_csv(folder / f"{what}.csv", index_col=0).loc[counts.index]
    if (folder / "truth_regions.csv").exists():
        out["regions"] = pd.read_csv(folder / "truth_regions.csv", index_col=0)["region"]
    return out


def markdown(table: pd.DataFrame, fmt: str = ".4f", index: bool = True) -> str:
    """A pipe table (no tabulate dependency)."""

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "–" if np.isnan(v) else format(v, fmt)
        return "–" if v is None else str(v)

    cols = ([table.index.name or ""] if index else []) + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, row in table.iterrows():
        values = ([str(key)] if index else []) + [cell(v) for v in row]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def rmse(est: pd.DataFrame, truth: pd.DataFrame) -> float:
    est = est.reindex(index=truth.index, columns=truth.columns).fillna(0.0)
    return float(np.sqrt(np.mean((est.to_numpy() - truth.to_numpy()) ** 2)))


def head_off_params() -> str:
    """The shipped parameters with the cell-fraction head's α set to ~0 (a temporary file)."""
    model, _ = UnrolledNMF.load(default_params_path())
    with np.errstate(all="ignore"):
        model.log_cell_smoothing.data.fill_(float(np.log(NO_CELL_SMOOTHING)))
    extra = UnrolledNMF.saved_extra(default_params_path())
    path = Path(tempfile.gettempdir()) / "stlnmf_head_off.pt"
    model.save(path, extra=extra)
    return str(path)


def run(data: dict, **option) -> dict:
    res = deconvolve(data["slide"], data["reference"], cell_type_key=data["key"], seed=0, **option)
    out = {
        "cells_per_spot": res.info.get("cells_per_spot"),
        "overdispersion": res.info.get("overdispersion"),
        "min_proportion": res.info.get("min_proportion"),
        "cell": res.cell_fractions,
        "mrna": res.mrna_fractions,
    }
    if "truth_proportions" in data:
        out["rmse_cell"] = rmse(res.cell_fractions, data["truth_proportions"])
        out["rmse_mrna"] = rmse(res.mrna_fractions, data["truth_mrna_fractions"])
    return out


OPTIONS = {
    "default": {},
    "min_proportion=0.05": {"min_proportion": 0.05},
    "min_proportion=0": {"min_proportion": 0.0},
    "no platform effect": {"fit_platform_effect": False},
    "no platform, min 0.05": {"fit_platform_effect": False, "min_proportion": 0.05},
    "sqrt weights": {"gene_weighting": "sqrt"},
    "head off": {"params": "HEAD_OFF"},
    "classic": {"method": "classic"},
    "n_markers=30": {"n_markers": 30},
    "n_markers=300": {"n_markers": 300},
}


def section_options(sets, results):
    head = head_off_params()
    for name in sets:
        data = load_set(name)
        truth = data["truth_proportions"]
        rows, per_type = [], {"truth (cells)": truth.mean()}
        per_type["truth (mRNA)"] = data["truth_mrna_fractions"].mean()
        nnls = nnls_like(data)
        rows.append(("NNLS (normalised)", rmse(nnls[0], truth),
                     rmse(nnls[1], data["truth_mrna_fractions"]), None, None, None))  # fmt: skip
        for label, option in OPTIONS.items():
            option = {k: (head if v == "HEAD_OFF" else v) for k, v in option.items()}
            r = run(data, **option)
            rows.append((label, r["rmse_cell"], r["rmse_mrna"], r["cells_per_spot"],
                         r["overdispersion"], r["min_proportion"]))  # fmt: skip
            if label in ("default", "no platform effect", "classic", "min_proportion=0"):
                per_type[f"{label} (cells)"] = r["cell"].mean()
        table = pd.DataFrame(rows, columns=["option", "cell RMSE", "mRNA RMSE", "cells/spot",
                                            "phi", "threshold"])  # fmt: skip
        print(f"\n## {name}: options\n")
        print(markdown(table, ".4f", index=False))
        pt = pd.DataFrame(per_type)
        print(f"\n## {name}: per-type mean (cells unless said)\n")
        print(markdown(pt, ".3f"))
        results[f"options/{name}"] = table.to_dict(orient="list")
        results[f"per_type/{name}"] = pt.to_dict()


def nnls_like(data):
    """Per-spot NNLS (the package's baseline), cell and mRNA fractions."""
    kw = {"cell_type_key": data["key"]}
    return (nnls_proportions(data["slide"], data["reference"], fractions="cell", **kw),
            nnls_proportions(data["slide"], data["reference"], fractions="mrna", **kw))  # fmt: skip


def _prepared(data, *, platform: bool):
    ref = build_reference(data["reference"], cell_type_key=data["key"])
    prep = prepare(data["slide"].X, data["slide"].var_names, ref, gene_weighting="nb")
    if platform:
        prep, _ = fit_platform_effect(prep, seed=0, refine_with=shipped_refinement_model(prep))
    return ref, prep


def _phi(prep, X, lib, V) -> float:
    return estimate_noise(X, lib, prep.B, V).overdispersion


def section_noise(sets, results):
    rows = []
    rng = np.random.default_rng(0)
    for name in sets:
        data = load_set(name)
        counts = data["truth_cellcounts"]
        true_n = float(counts.sum(1).mean())
        for platform in (False, True):
            ref, prep = _prepared(data, platform=platform)
            types = list(prep.cell_types)
            keep = data["slide"].obs_names[prep.spot_mask]
            all_rows = np.arange(prep.X.shape[0])
            V = quick_fit(prep, all_rows)
            phi_fit = _phi(prep, prep.X, prep.library_size, V)
            # the truth's mRNA shares over the selected genes (whole-transcriptome / gene share)
            tm = data["truth_mrna_fractions"].loc[keep, types].to_numpy() * prep.gene_share
            tm = tm / np.maximum(tm.sum(1, keepdims=True), 1e-12)
            phi_true = _phi(prep, prep.X, prep.library_size, tm)
            sub = ref.subset_genes(prep.genes)
            phi_cell = reference_overdispersion(sub, seed=0)
            # pseudo-spots summed from the reference's own cells (half A is the profile, half B
            # the cells), with the real spots' true cell counts per type
            labels = sub.cell_labels
            C = sub.cell_counts.tocsr()
            half = rng.random(C.shape[0]) < 0.5
            pseudo, truth_v = [], []
            cc = counts.loc[keep, types].to_numpy()
            for spot in cc:
                x = np.zeros(C.shape[1])
                for k, n_k in enumerate(spot):
                    pool = np.flatnonzero(half & (labels == k))
                    if n_k == 0 or pool.size == 0:
                        continue
                    pick = rng.choice(pool, int(n_k), replace=pool.size < n_k)
                    x += np.asarray(C[pick].sum(0)).ravel()
                pseudo.append(x)
            P = np.array(pseudo)
            lib_p = P.sum(1)
            ok = lib_p > 0
            P, lib_p = P[ok], lib_p[ok]
            truth_v = np.asarray(quick_fit_on(prep, sp.csr_matrix(P / lib_p[:, None]), lib_p))
            phi_pseudo = _phi(prep, sp.csr_matrix(P / lib_p[:, None]), lib_p, truth_v)
            # library-size estimate: spot counts / reference counts per cell of the fitted mix
            cells = V / prep.mrna_content[None, :]
            cells /= cells.sum(1, keepdims=True)
            per_cell = cells @ prep.mrna_content
            n_lib = float(np.median(prep.library_size / per_cell))
            n_true_eff = float(np.mean(1 / np.maximum((cc_share(cc, prep, data, keep)), 1e-12)))
            rows.append({
                "set": name, "platform": platform, "true cells": true_n,
                "true eff. cells (1/Σw²)": n_true_eff,
                "phi cells": phi_cell, "phi spots (fit)": phi_fit, "phi spots (true V)": phi_true,
                "phi pseudo-spots": phi_pseudo,
                "n = phi_c/phi (fit)": phi_cell / phi_fit,
                "n (true V)": phi_cell / phi_true,
                "n (pseudo)": phi_cell / phi_pseudo,
                "n (library)": n_lib,
            })  # fmt: skip
    table = pd.DataFrame(rows)
    print("\n## cells per spot, taken apart\n")
    print(markdown(table.T, ".4g"))
    results["noise"] = table.to_dict(orient="list")


def quick_fit_on(prep, X, lib):
    from dataclasses import replace

    p2 = replace(prep, X=X, library_size=lib)
    return quick_fit(p2, np.arange(X.shape[0]))


def cc_share(cc, prep, data, keep):
    """Σ w² per spot, w the cells' mRNA shares (type content as the reference's), averaged."""
    w2 = []
    for spot in cc:
        sizes = np.repeat(prep.mrna_content, spot.astype(int))
        w = sizes / sizes.sum()
        w2.append((w**2).sum())
    return np.array(w2)


def section_content(sets, results):
    for name in sets:
        data = load_set(name)
        ref = build_reference(data["reference"], cell_type_key=data["key"])
        lib = np.asarray(data["slide"].X.sum(1)).ravel()
        counts = data["truth_cellcounts"]
        mrna = data["truth_mrna_fractions"].to_numpy() * lib[:, None]
        n = counts.to_numpy()
        per_cell = mrna.sum(0) / np.maximum(n.sum(0), 1)
        t = pd.DataFrame({
            "reference counts/cell": ref.mrna_content.reindex(counts.columns).to_numpy(),
            "spot cells' counts/cell": per_cell, "cells in spots": n.sum(0),
        }, index=counts.columns)  # fmt: skip
        t["ratio spot/ref"] = t.iloc[:, 1] / t.iloc[:, 0]
        print(f"\n## {name}: mRNA per cell, reference vs the spots' cells\n")
        print(markdown(t, ".3g"))
        results[f"content/{name}"] = t.to_dict()


def dominance(fr: pd.DataFrame, regions: pd.Series) -> pd.DataFrame:
    dom = fr.idxmax(1)
    regions = regions.reindex(fr.index)
    out = {}
    for region in sorted(regions.dropna().unique()):
        d = dom[regions == region].value_counts(normalize=True)
        out[region] = ", ".join(f"{k} {v:.0%}" for k, v in d.head(3).items())
    return pd.Series(out)


def section_pdac(results, options=None):
    data = load_set("pdac_a_card")
    options = options or {"default": {}, "no platform effect": {"fit_platform_effect": False}}
    rows = {}
    for label, option in options.items():
        r = run(data, **option)
        rows[f"{label}: cells"] = dominance(r["cell"], data["regions"])
        rows[f"{label}: mRNA"] = dominance(r["mrna"], data["regions"])
    t = pd.DataFrame(rows).T
    print("\n## pdac_a_card: dominant type per region (share of the region's spots)\n")
    print(markdown(t))
    results["pdac"] = t.to_dict()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="options,noise,content,pdac")
    ap.add_argument("--sets", default=",".join(REAL_SETS))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    sets = a.sets.split(",")
    results: dict = {}
    for section in a.sections.split(","):
        if section == "options":
            section_options(sets, results)
        elif section == "noise":
            section_noise(sets, results)
        elif section == "content":
            section_content(sets, results)
        elif section == "pdac":
            section_pdac(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
