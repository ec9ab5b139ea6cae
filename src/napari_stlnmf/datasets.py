"""Bundled demo data and synthetic generators (deterministic, no downloads).

The demo slide is fully synthetic: a Visium-like hexagonal spot layout over an H&E-like
tissue image with layered regions, a single-cell-like reference (negative-binomial counts,
type-specific markers and cell sizes), and counts summed from reference-like cells with a
platform effect. True proportions are in ``slide.obsm['true_proportions']``.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

DATA_DIR = Path(__file__).parent / "data"
DEMO_SLIDE = DATA_DIR / "demo_slide.h5ad"
DEMO_REFERENCE = DATA_DIR / "demo_reference.h5ad"
DEMO_CELL_TYPE_KEY = "cell_type"
TRUTH_KEY = "true_proportions"

__all__ = [
    "DEMO_CELL_TYPE_KEY",
    "hex_layout",
    "load_demo",
    "make_demo",
    "make_reference",
    "tissue_image",
]


def load_demo() -> tuple[ad.AnnData, ad.AnnData]:
    """The bundled demo ``(slide, reference)``; truth in ``slide.obsm['true_proportions']``."""
    return ad.read_h5ad(DEMO_SLIDE), ad.read_h5ad(DEMO_REFERENCE)


def make_reference(
    n_types: int = 8,
    n_genes: int = 600,
    cells_per_type: int = 250,
    *,
    marker_fraction: float = 0.04,
    seed: int = 0,
    cell_seed: int | None = None,
    type_names: list[str] | None = None,
) -> ad.AnnData:
    """A single-cell-like reference: NB counts, shared baseline, type markers, cell sizes.

    Types share most of their expression (as real cell types do) and differ by a few
    percent of marker genes, so the signature columns are correlated.
    """
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=-1.0, sigma=1.6, size=n_genes)
    lfc = rng.normal(scale=0.35, size=(n_types, n_genes))
    n_mark = max(3, int(marker_fraction * n_genes))
    for t in range(n_types):
        idx = rng.choice(n_genes, size=n_mark, replace=False)
        lfc[t, idx] += rng.normal(2.2, 0.6, size=n_mark)
    prof = base[None, :] * np.exp(lfc)
    prof /= prof.sum(1, keepdims=True)
    mean_size = rng.uniform(1500, 6000, size=n_types)  # cell types differ in mRNA content
    names = type_names or [f"type_{t}" for t in range(n_types)]
    rows, labels = [], []
    theta = 3.0
    rng = np.random.default_rng(seed if cell_seed is None else cell_seed)
    for t in range(n_types):
        size = rng.lognormal(np.log(mean_size[t]), 0.35, size=cells_per_type)
        mu = size[:, None] * prof[t][None, :]
        lam = rng.gamma(theta, mu / theta)
        rows.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
        labels += [names[t]] * cells_per_type
    X = sp.vstack(rows).tocsr()
    obs = pd.DataFrame(
        {DEMO_CELL_TYPE_KEY: pd.Categorical(labels)}, index=[f"cell_{i}" for i in range(X.shape[0])]
    )
    var = pd.DataFrame(index=[f"Gene{g:04d}" for g in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)


def hex_layout(n_rows: int, n_cols: int, pitch: float = 100.0, origin=(300.0, 300.0)) -> np.ndarray:
    """(x, y) centres of a Visium-like hexagonal lattice (odd rows shifted by half a pitch)."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = origin[0] + (c + 0.5 * (r % 2)) * pitch
    y = origin[1] + r * pitch * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()])


def tissue_regions(xy_img: np.ndarray, size: int) -> np.ndarray:
    """Region index (0..3) at image positions: curved layers plus a round structure; -1 outside."""
    x, y = xy_img[:, 0] / size, xy_img[:, 1] / size
    cx, cy = 0.5, 0.5
    inside = ((x - cx) / 0.46) ** 2 + ((y - cy) / 0.42) ** 2 <= 1.0
    wave = y + 0.06 * np.sin(6.0 * x)
    region = np.where(wave < 0.36, 0, np.where(wave < 0.56, 1, 2))
    blob = (x - 0.68) ** 2 + (y - 0.7) ** 2 < 0.12**2
    region = np.where(blob, 3, region)
    return np.where(inside, region, -1)


def tissue_image(size: int = 600, *, seed: int = 0) -> np.ndarray:
    """An H&E-like RGB image (uint8) with the regions of :func:`tissue_regions`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    reg = tissue_regions(np.column_stack([xx.ravel(), yy.ravel()]).astype(float), size).reshape(
        size, size
    )
    palette = np.array(
        [[236, 176, 206], [205, 120, 175], [170, 95, 160], [120, 70, 150], [245, 240, 242]],
        dtype=float,
    )  # eosin-pink to haematoxylin-purple, background near white
    img = palette[np.where(reg < 0, 4, reg)]
    # nuclei-like dark dots, denser in cell-rich regions
    density = np.where(reg < 0, 0.0, 0.002 + 0.004 * np.maximum(reg, 0))
    dots = rng.random((size, size)) < density
    img[dots] = [80, 40, 120]
    noise = rng.normal(scale=8.0, size=img.shape)
    img = np.clip(img + noise, 0, 255)
    # slight blur so dots look like nuclei, not pixels
    k = np.array([1, 2, 1], dtype=float) / 4
    for axis in (0, 1):
        img = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, img)
    return img.astype(np.uint8)


def make_demo(seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """Build the demo ``(slide, reference)`` deterministically (what ``data/`` ships)."""
    from .io import SPOT_DIAMETER_PER_SPACING
    from .preprocess import build_reference
    from .simulate import simulate_counts, simulate_proportions

    rng = np.random.default_rng(seed)
    names = sorted(
        [
            "neuron_L1",
            "neuron_L2",
            "neuron_L3",
            "astrocyte",
            "oligodendrocyte",
            "microglia",
            "endothelial",
            "immune",
        ]
    )
    reference = make_reference(n_types=len(names), type_names=names, seed=seed)
    # the slide's cells come from a *different* draw than the reference (as in real data)
    cells = make_reference(n_types=len(names), type_names=names, seed=seed, cell_seed=seed + 1)
    size = 600
    full_res_scale = 0.25  # image pixels per full-resolution pixel (like tissue_hires_scalef)
    pitch_img = 16.0  # spot spacing in image pixels
    xy_img = hex_layout(30, 30, pitch=pitch_img, origin=(60.0, 70.0))
    reg = tissue_regions(xy_img, size)
    keep = reg >= 0
    xy_img, reg = xy_img[keep], reg[keep]
    xy_full = xy_img / full_res_scale
    # proportions: each region favours a few types, plus smooth variation and sparsity
    favoured = [
        ["neuron_L1", "astrocyte", "endothelial"],
        ["neuron_L2", "astrocyte", "microglia"],
        ["neuron_L3", "oligodendrocyte", "endothelial"],
        ["immune", "microglia", "oligodendrocyte"],
    ]
    favour = np.array([[names.index(t) for t in row] for row in favoured])
    p = len(names)
    smooth = simulate_proportions(xy_full, p, kind="smooth", rng=rng, max_types_per_spot=4)
    logits = np.log(smooth + 0.05)
    for r in range(4):
        logits[np.ix_(reg == r, favour[r])] += np.array([3.0, 1.8, 1.0])
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    prob = np.where(prob >= 0.06, prob, 0.0)
    prob /= prob.sum(1, keepdims=True)
    sim_ref = build_reference(cells, cell_type_key=DEMO_CELL_TYPE_KEY)
    assert sim_ref.cell_types == names  # columns of prob follow the reference's type order
    counts, cell_frac, mrna_frac, _ = simulate_counts(
        prob,
        sim_ref,
        mean_cells=8.0,
        library_sizes=rng.lognormal(np.log(4000), 0.4, size=500),
        platform_sigma=0.2,
        rng=rng,
    )
    n = len(xy_full)
    barcodes = [f"SPOT{i:04d}-1" for i in range(n)]
    obs = pd.DataFrame(
        {"region": pd.Categorical([f"layer_{r}" if r < 3 else "nodule" for r in reg])},
        index=barcodes,
    )
    slide = ad.AnnData(
        X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=reference.var_names.copy())
    )
    slide.obsm["spatial"] = xy_full.astype(np.float64)
    slide.obsm[TRUTH_KEY] = pd.DataFrame(cell_frac, index=barcodes, columns=names)
    slide.obsm["true_mrna_fractions"] = pd.DataFrame(mrna_frac, index=barcodes, columns=names)
    slide.uns["spatial"] = {
        "demo": {
            "images": {"hires": tissue_image(size, seed=seed)},
            "scalefactors": {
                "tissue_hires_scalef": full_res_scale,
                "spot_diameter_fullres": pitch_img / full_res_scale * SPOT_DIAMETER_PER_SPACING,
            },
            "metadata": {"source": "napari-stlnmf synthetic demo (make_demo)"},
        }
    }
    return slide, reference


def write_demo(out_dir: Path = DATA_DIR, seed: int = 0) -> None:
    slide, reference = make_demo(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    slide.write_h5ad(out_dir / DEMO_SLIDE.name, compression="gzip")
    reference.write_h5ad(out_dir / DEMO_REFERENCE.name, compression="gzip")


if __name__ == "__main__":
    write_demo()
