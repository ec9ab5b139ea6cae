"""Benchmark slides with ground truth: shared data sets and simulations on real layouts.

Every slide is ``(name, slide AnnData, reference, cell_type_key, truth, truth_mrna, note)``:
``truth`` holds the true cell fractions (share of each spot's cells), ``truth_mrna`` the true
mRNA fractions (share of each spot's transcripts); they differ where cell types differ in
mRNA per cell. The reference is a single-cell AnnData where one exists (peers need it),
else a signature.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

SHARED = Path(
    os.environ.get("STLNMF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
KEY = "cell_type"


def _slide(counts: np.ndarray, xy: np.ndarray, genes, barcodes=None) -> ad.AnnData:
    barcodes = barcodes if barcodes is not None else [f"spot{i}" for i in range(len(xy))]
    a = ad.AnnData(
        X=sp.csr_matrix(np.asarray(counts, dtype=np.float32)),
        obs=pd.DataFrame(index=list(map(str, barcodes))),
        var=pd.DataFrame(index=list(map(str, genes))),
    )
    a.obsm["spatial"] = np.asarray(xy, dtype=float)
    return a


def mrna_truth(truth: pd.DataFrame, mrna_per_cell) -> pd.DataFrame:
    """mRNA fractions implied by cell fractions and each type's mRNA per cell."""
    w = truth.to_numpy(float) * np.asarray(mrna_per_cell, dtype=float)[None, :]
    return pd.DataFrame(
        w / np.maximum(w.sum(1, keepdims=True), 1e-12), index=truth.index, columns=truth.columns
    )


def paper_grids(noise_counts=(2000,)):
    """The original paper's synthetic grids: X = B V with B the types' mean profiles per cell,
    so V (the truth) is cell fractions and mRNA fractions weight V by B's column totals."""
    out = []
    for name in ("synthetic_square_2x2", "synthetic_circle_2x2"):
        folder = SHARED / name
        if not folder.is_dir():
            continue
        counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
        coords = pd.read_csv(folder / "coords.csv", index_col=0)
        sig = pd.read_csv(folder / "reference_signature.csv", index_col=0)
        truth = pd.read_csv(folder / "truth_proportions.csv", index_col=0)
        X = counts.to_numpy()
        xy = coords[["x", "y"]].to_numpy(float)
        if name == "synthetic_square_2x2":
            sc = _square_sc(folder)
            for depth in noise_counts:
                noisy = np.random.default_rng(0).poisson(X / X.sum(1, keepdims=True) * depth)
                content = (
                    pd.DataFrame(sc.X.toarray(), columns=sc.var_names)
                    .groupby(sc.obs[KEY].to_numpy())
                    .mean()
                    .sum(1)
                )
                out.append(
                    (
                        f"paper square 2x2 + Poisson ({depth}/spot)",
                        _slide(noisy, xy, counts.columns, counts.index),
                        sc,
                        KEY,
                        truth,
                        mrna_truth(truth, content.reindex(truth.columns).to_numpy()),
                        (
                            "original paper's grid; noiseless X given Poisson noise; "
                            "sc reference (B = its type means)"
                        ),
                    )
                )
        else:
            out.append(
                (
                    "paper circle 2x2",
                    _slide(X, xy, counts.columns, counts.index),
                    sig,
                    None,
                    truth,
                    mrna_truth(truth, sig[truth.columns].sum(0).to_numpy()),
                    "original paper's noisy grid; collinear signature; no sc reference",
                )
            )
    return out


def _square_sc(folder: Path) -> ad.AnnData:
    sc = pd.read_csv(folder / "sc_counts.csv.gz", index_col=0)
    labels = pd.read_csv(folder / "sc_labels.csv", index_col=0)
    ref = ad.AnnData(
        X=sp.csr_matrix(sc.to_numpy(np.float32)),
        obs=pd.DataFrame({KEY: pd.Categorical(labels.loc[sc.index, "cell_type"])}, index=sc.index),
        var=pd.DataFrame(index=sc.columns),
    )
    return ref


def real_layouts() -> dict[str, np.ndarray]:
    """Spot layouts of real slides: Visium (4,235 in-tissue spots) and ST mouse olfactory bulb."""
    layouts = {}
    v = SHARED / "visium_demo_scanpy" / "tissue_positions_all.csv"
    if v.exists():
        pos = pd.read_csv(v)
        pos = pos[pos.in_tissue == 1]
        layouts["Visium layout"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    m = SHARED / "mob_rep12" / "coords.csv"
    if m.exists():
        layouts["ST MOB layout"] = pd.read_csv(m, index_col=0)[["x", "y"]].to_numpy(float)
    return layouts


def square_bins(n_rows: int, n_cols: int, pitch: float = 16.0) -> np.ndarray:
    """Centres of a square grid of bins (Visium HD-like; µm)."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return np.column_stack([c.ravel() * pitch, r.ravel() * pitch]).astype(np.float64)


def split_reference(ref: ad.AnnData, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """Disjoint halves of each type's cells: one is the reference, the other fills the slide."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for t in ref.obs[KEY].cat.categories:
        idx = np.flatnonzero((ref.obs[KEY] == t).to_numpy())
        rng.shuffle(idx)
        a.append(idx[: len(idx) // 2])
        b.append(idx[len(idx) // 2 :])
    return ref[np.sort(np.concatenate(a))].copy(), ref[np.sort(np.concatenate(b))].copy()


def simulated(quick: bool = False):
    """Slides simulated from real(istic) single cells on real layouts, of several kinds.

    The reference given to the methods and the cells summed into the slide are disjoint halves.
    """
    from napari_stlnmf.datasets import hex_layout, make_reference
    from napari_stlnmf.preprocess import build_reference
    from napari_stlnmf.simulate import simulate_slide

    layouts = real_layouts()
    visium = layouts.get("Visium layout", hex_layout(40, 40))
    mob = layouts.get("ST MOB layout", hex_layout(15, 18))
    specs = [
        # name, n_types, kind, layout, depth, platform sigma
        ("sim 8 types smooth, Visium, deep", 8, "smooth", "Visium layout", 10000, 0.0),
        (
            "sim 8 types regions, Visium, shallow, platform",
            8,
            "regions",
            "Visium layout",
            1000,
            0.3,
        ),
        ("sim 20 types gradient, Visium, platform", 20, "gradient", "Visium layout", 3000, 0.3),
        ("sim 5 types regions, MOB, deep", 5, "regions", "ST MOB layout", 10000, 0.0),
        ("sim 50 types smooth, Visium, platform", 50, "smooth", "Visium layout", 5000, 0.3),
    ]
    square = SHARED / "synthetic_square_2x2"
    if square.is_dir():
        specs.append(
            (
                "sim paper sc cells (4 types) smooth, Visium, platform",
                "square_sc",
                "smooth",
                "Visium layout",
                3000,
                0.3,
            )
        )
    # Visium HD-like 16 µm bins: one or two cells each, shallow (the 'auto' zeroing
    # threshold's case)
    specs.append(
        (
            "sim 10 types regions, HD bins (1-2 cells), shallow, platform",
            10,
            "regions",
            "square bins",
            300,
            0.3,
            1.5,
        )
    )
    if quick:
        specs = specs[:2]
    out = []
    for i, (name, types, kind, layout, depth, platform, *cells) in enumerate(specs):
        mean_cells = cells[0] if cells else 8.0
        if types == "square_sc":
            full = _square_sc(square)
        else:
            full = make_reference(
                n_types=types, n_genes=max(600, 30 * types), cells_per_type=120, seed=100 + i
            )
        reference, slide_cells = split_reference(full, seed=i)
        xy = {"Visium layout": visium, "ST MOB layout": mob, "square bins": square_bins(40, 40)}[
            layout
        ]
        sim = simulate_slide(
            xy,
            build_reference(slide_cells, cell_type_key=KEY),
            kind=kind,
            mean_cells=mean_cells,
            library_sizes=np.full(100, float(depth)),
            platform_sigma=platform,
            seed=1000 + i,
        )
        slide = _slide(sim.counts, xy, full.var_names)
        types_ = build_reference(slide_cells, cell_type_key=KEY).cell_types
        truth = pd.DataFrame(sim.cell_fractions, index=slide.obs_names, columns=types_)
        truth_mrna = pd.DataFrame(sim.mrna_fractions, index=slide.obs_names, columns=types_)
        out.append(
            (
                name,
                slide,
                reference,
                KEY,
                truth,
                truth_mrna,
                (
                    f"{kind}; {layout}; {depth} counts/spot; {mean_cells:g} cells/spot on average; "
                    f"platform σ={platform}"
                ),
            )
        )
    return out


def demo():
    from napari_stlnmf.datasets import TRUTH_KEY, load_demo

    slide, reference = load_demo()
    truth, truth_mrna = slide.obsm[TRUTH_KEY], slide.obsm["true_mrna_fractions"]
    for key in (TRUTH_KEY, "true_mrna_fractions"):  # methods never see the truth
        del slide.obsm[key]
    return [
        (
            "bundled demo (8 types, synthetic H&E)",
            slide,
            reference,
            KEY,
            truth,
            truth_mrna,
            "package demo slide",
        )
    ]


def all_slides(quick: bool = False):
    return demo() + paper_grids() + simulated(quick)
