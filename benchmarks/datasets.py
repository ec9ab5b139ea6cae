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


# --- real tissue ---------------------------------------------------------------------------

REAL_PREFIX = "real "  # slide names of the real-tissue sets start with this
REAL_SETS = {  # folder -> (slide name, one-line description for the page)
    "seqfish_ob": (
        "real seqFISH+ olfactory bulb (seqfish_ob)",
        (
            "111 pseudo-spots (35 µm bins of 2-24 segmented cells) x 10,000 genes; reference "
            "866 cells of 3 other fields of view, 9 types"
        ),
    ),
    "osmfish_ss": (
        "real osmFISH cortex (osmfish_ss)",
        (
            "437 pseudo-spots (55 µm bins of 2-18 cells) x 33 genes; reference 2,247 cells of "
            "disjoint 275 µm stripes, 12 classes"
        ),
    ),
}
PDAC_NAME = "real PDAC-A ST, pathologist regions (pdac_a_card)"

# PDAC: the signature types expected to dominate each pathologist region
PDAC_EXPECTED = {
    "Duct Epithelium": (
        "Ductal_APOL1_high-hypoxic",
        "Ductal_CRISP3_high-centroacinar_like",
        "Ductal_MHC_Class_II",
        "Ductal_terminal_ductal_like",
    ),
    "Pancreatic": ("Acinar_cells",),
    "Cancer": ("Cancer_clone_A", "Cancer_clone_B"),
    "Stroma": (
        "Fibroblasts",
        "Endothelial_cells",
        "Macrophages_A",
        "Macrophages_B",
        "Mast_cells",
        "Monocytes",
        "T_cells_&_NK_cells",
        "mDCs_A",
        "mDCs_B",
        "pDCs",
    ),
}  # the other types (Endocrine_cells, RBCs, Tuft_cells) belong to no region's group


def _read_slide(folder: Path) -> ad.AnnData:
    """Spots x genes integer counts (sparse) with obsm['spatial'] from coords.csv."""
    counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    if not coords.index.equals(counts.index):
        raise ValueError(f"{folder.name}: coords.csv and counts.csv.gz list different spots")
    X = counts.to_numpy()
    if not np.issubdtype(X.dtype, np.integer):
        raise ValueError(f"{folder.name}: counts are not integers")
    a = ad.AnnData(
        X=sp.csr_matrix(X.astype(np.int32)),
        obs=pd.DataFrame(index=counts.index.astype(str)),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    a.obsm["spatial"] = coords[["x", "y"]].to_numpy(float)
    return a


def _read_sc(folder: Path) -> ad.AnnData:
    """The single-cell reference: cells x genes integer counts, obs['cell_type']."""
    sc = pd.read_csv(folder / "sc_counts.csv.gz", index_col=0)
    labels = pd.read_csv(folder / "sc_labels.csv", index_col=0)
    if not labels.index.equals(sc.index):
        raise ValueError(f"{folder.name}: sc_labels.csv and sc_counts.csv.gz list different cells")
    return ad.AnnData(
        X=sp.csr_matrix(sc.to_numpy().astype(np.int32)),
        obs=pd.DataFrame(
            {KEY: pd.Categorical(labels["cell_type"].astype(str)), "cluster": labels["cluster"]},
            index=sc.index.astype(str),
        ),
        var=pd.DataFrame(index=sc.columns.astype(str)),
    )


def _aligned_truth(folder: Path, file: str, spots: pd.Index, types: list[str]) -> pd.DataFrame:
    """A truth table with rows = the slide's spots and columns = the reference's type names.

    Types of the reference absent from the truth file become zero columns; a truth type the
    reference does not have, a spot without truth or rows not summing to 1 raise.
    """
    t = pd.read_csv(folder / file, index_col=0)
    t.index = t.index.astype(str)
    extra = sorted(set(t.columns) - set(types))
    if extra:
        raise ValueError(f"{folder.name}/{file}: types {extra} are not in the reference")
    missing = spots.difference(t.index)
    if len(missing):
        raise ValueError(f"{folder.name}/{file}: no truth for spots {list(missing[:5])}")
    t = t.reindex(index=spots, columns=types, fill_value=0.0).astype(float)
    if not np.allclose(t.sum(1), 1.0, atol=1e-4):
        raise ValueError(f"{folder.name}/{file}: rows do not sum to 1")
    return t


def load_real(name: str):
    """One real-tissue set with truth (seqfish_ob or osmfish_ss) as a benchmark slide tuple.

    Slide: sparse integer counts, obsm['spatial'] = bin centres (µm). Reference: the single cells
    (disjoint from the spots) with obs['cell_type']. Truth: cell fractions
    (truth_proportions.csv) and mRNA fractions (truth_mrna_fractions.csv), aligned to the spots and
    to the reference's (sorted) type names. The type names of both files are checked to be
    reference types (they are, for both sets; seqfish_ob's 'Pia' has reference cells but no cell
    in any spot, so it is a zero column of the truth).
    """
    folder = SHARED / name
    slide = _read_slide(folder)
    ref = _read_sc(folder)
    types = sorted(ref.obs[KEY].cat.categories)
    truth = _aligned_truth(folder, "truth_proportions.csv", slide.obs_names, types)
    truth_mrna = _aligned_truth(folder, "truth_mrna_fractions.csv", slide.obs_names, types)
    return (REAL_SETS[name][0], slide, ref, KEY, truth, truth_mrna, REAL_SETS[name][1])


def real_tissue():
    """The real-tissue sets with truth that are present under the shared data folder."""
    return [load_real(n) for n in REAL_SETS if (SHARED / n).is_dir()]


def load_pdac():
    """PDAC-A (CARD): slide, the genes x 20 types mean-count signature, and the pathologist
    region of each spot (a Series over the spots that have one: 426 of the 428).

    The signature's type names are checked against :data:`PDAC_EXPECTED`."""
    folder = SHARED / "pdac_a_card"
    slide = _read_slide(folder)
    sig = pd.read_csv(folder / "reference_signature.csv", index_col=0)
    sig.index = sig.index.astype(str)
    sig = sig[~sig.index.duplicated()]
    unknown = {t for ts in PDAC_EXPECTED.values() for t in ts} - set(sig.columns)
    if unknown:
        raise ValueError(f"pdac_a_card: expected types {sorted(unknown)} not in the signature")
    regions = pd.read_csv(folder / "truth_regions.csv", index_col=0)["region"]
    regions.index = regions.index.astype(str)
    regions = regions.reindex(slide.obs_names).dropna()
    if set(regions) - set(PDAC_EXPECTED):
        raise ValueError(f"pdac_a_card: unknown regions {set(regions) - set(PDAC_EXPECTED)}")
    note = (
        f"{slide.n_obs} ST spots x {slide.n_vars} genes; signature {sig.shape[0]} genes x "
        f"{sig.shape[1]} types (PDAC-A inDrop mean counts); {len(regions)} spots with a region"
    )
    return PDAC_NAME, slide, sig, regions, note


def all_slides(quick: bool = False):
    return real_tissue() + demo() + paper_grids() + simulated(quick)
