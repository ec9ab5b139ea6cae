"""A sample slide on *real* histology with *simulated* expression (pure: no Qt, no napari).

The tissue image, the in-tissue spot layout and the scale factors are real: a 10x Visium
lowres H&E image (600 x 600 px) with its Space Ranger ``tissue_positions`` and
``scalefactors_json.json``, copied from the scanpy test data
(github.com/scverse/scanpy, ``tests/_data/visium_data/1.0.0/``, BSD-3-Clause, see
``data/LICENSE_scanpy.txt``). Its real counts cover too few genes to deconvolve, so the
expression of each in-tissue spot is *simulated* from the bundled demo reference:

1. mean colour and texture of the image under each spot
   (:func:`napari_stlnmf.graph.spot_image_features`, averaged over ~1.6 spot pitches);
2. k-means of those features into tissue regions (deterministic initialisation), so the
   simulated cell types follow what the image shows;
3. per region a few favoured cell types plus smooth random variation
   (:func:`napari_stlnmf.simulate.simulate_proportions`), sparsified;
4. counts drawn from single cells of the demo cell types
   (:func:`napari_stlnmf.simulate.simulate_counts`).

Everything is seeded; :func:`make_histology_slide` takes well under a second.
True proportions are in ``slide.obsm['true_proportions']`` and the region of each spot in
``slide.obs['image_region']``.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._constants import SPATIAL_KEY

__all__ = [
    "HISTOLOGY_IMAGE",
    "HISTOLOGY_LIBRARY_ID",
    "HISTOLOGY_POSITIONS",
    "HISTOLOGY_SCALEFACTORS",
    "image_regions",
    "load_histology_layout",
    "make_histology_slide",
]

DATA_DIR = Path(__file__).parent / "data"
HISTOLOGY_IMAGE = DATA_DIR / "histology_tissue_lowres_image.png"
HISTOLOGY_POSITIONS = DATA_DIR / "histology_tissue_positions.csv"
HISTOLOGY_SCALEFACTORS = DATA_DIR / "histology_scalefactors_json.json"
HISTOLOGY_LIBRARY_ID = "real_HE_simulated_expression"
TRUTH_KEY = "true_proportions"
SOURCE = (
    "Real 10x Visium H&E lowres image, spot layout and scale factors from the scanpy test "
    "data (github.com/scverse/scanpy tests/_data/visium_data/1.0.0, BSD-3-Clause); "
    "expression SIMULATED by napari-stlnmf (histology.make_histology_slide) from the demo "
    "reference, with cell types following k-means regions of the image."
)


def load_histology_layout() -> tuple[np.ndarray, pd.Index, np.ndarray, dict]:
    """The real layout: ``(xy_fullres, barcodes, lowres_image, scalefactors)``, in-tissue spots."""
    from PIL import Image

    pos = pd.read_csv(HISTOLOGY_POSITIONS, index_col=0)
    pos = pos[pos["in_tissue"] == 1]
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    with Image.open(HISTOLOGY_IMAGE) as im:
        image = np.asarray(im.convert("RGB"))
    scalefactors = json.loads(HISTOLOGY_SCALEFACTORS.read_text())
    return xy, pd.Index(pos.index.astype(str)), image, scalefactors


def image_regions(
    image: np.ndarray, xy_px: np.ndarray, *, n_regions: int = 4, radius_px: float = 10.0
) -> np.ndarray:
    """Cluster spots by the colour/texture of the image around them (deterministic k-means).

    Centres start at quantiles of the first principal component, so the labels do not
    depend on a random draw; label 0..n_regions-1 follow that component.
    """
    from scipy.cluster.vq import kmeans2

    from .graph import spot_image_features

    f = spot_image_features(image, xy_px, radius_px).astype(np.float64)
    z = (f - f.mean(0)) / np.maximum(f.std(0), 1e-9)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    order = np.argsort(z @ vt[0])
    init = np.stack([z[order[int((i + 0.5) / n_regions * len(order))]] for i in range(n_regions)])
    _, labels = kmeans2(z, init, minit="matrix", iter=30)
    return labels.astype(np.int64)


def make_histology_slide(
    seed: int = 0, *, mean_cells: float = 8.0
) -> tuple[ad.AnnData, ad.AnnData]:
    """``(slide, reference)``: real H&E + real spot layout, expression simulated (seeded).

    The reference is the bundled demo reference (``obs['cell_type']``); the slide's cells
    are a different draw of the same cell types (as with real data).
    """
    from .datasets import DEMO_CELL_TYPE_KEY, DEMO_REFERENCE, make_reference
    from .preprocess import build_reference
    from .simulate import simulate_counts, simulate_proportions

    rng = np.random.default_rng(seed)
    xy, barcodes, image, scalefactors = load_histology_layout()
    scalef = float(scalefactors["tissue_lowres_scalef"])
    region = image_regions(image, xy * scalef)

    reference = ad.read_h5ad(DEMO_REFERENCE)
    names = [str(c) for c in reference.obs[DEMO_CELL_TYPE_KEY].cat.categories]
    p = len(names)
    n_genes = reference.n_vars
    cells = make_reference(
        n_types=p, n_genes=n_genes, type_names=names, seed=seed, cell_seed=seed + 1
    )
    cells.var_names = reference.var_names.copy()

    # each image region favours a few types; smooth variation on top; sparse mixtures
    favour = np.array([[2, 3, 1], [4, 0, 6], [5, 7, 3], [1, 6, 2], [7, 0, 2], [3, 5, 4]]) % p
    smooth = simulate_proportions(xy, p, kind="smooth", rng=rng, max_types_per_spot=4)
    logits = np.log(smooth + 0.02)
    for r in range(int(region.max()) + 1):
        logits[np.ix_(region == r, favour[r % len(favour)])] += np.array([2.4, 1.3, 0.6])
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    prob = np.where(prob >= 0.06, prob, 0.0)
    prob /= prob.sum(1, keepdims=True)

    sim_ref = build_reference(cells, cell_type_key=DEMO_CELL_TYPE_KEY)
    counts, cell_frac, mrna_frac, _ = simulate_counts(
        prob,
        sim_ref,
        mean_cells=mean_cells,
        library_sizes=rng.lognormal(np.log(4000), 0.4, size=500),
        platform_sigma=0.2,
        rng=rng,
    )
    obs = pd.DataFrame(
        {"image_region": pd.Categorical([f"region_{r}" for r in region])}, index=barcodes
    )
    slide = ad.AnnData(
        X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=reference.var_names.copy())
    )
    slide.obsm[SPATIAL_KEY] = xy
    slide.obsm[TRUTH_KEY] = pd.DataFrame(cell_frac, index=barcodes, columns=names)
    slide.obsm["true_mrna_fractions"] = pd.DataFrame(mrna_frac, index=barcodes, columns=names)
    slide.uns["spatial"] = {
        HISTOLOGY_LIBRARY_ID: {
            "images": {"lowres": image},
            "scalefactors": {k: float(v) for k, v in scalefactors.items()},
            "metadata": {"source": SOURCE, "seed": int(seed)},
        }
    }
    return slide, reference
