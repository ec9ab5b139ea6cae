"""Static figures (matplotlib, no GUI): per-type maps over the tissue image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import io
from ._constants import SPATIAL_KEY


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def map_background(adata, library_id=None):
    """``(image or None, scalefactor, spot diameter in image pixels)``; scale 1 without image.

    The diameter is :func:`napari_stlnmf.io.spot_diameter`, as for the napari layers.
    """
    found = io.get_image(adata, library_id=library_id)
    image, scalef = (None, 1.0) if found is None else found[:2]
    return image, scalef, io.spot_diameter(adata, library_id) * scalef


def _spot_collection(xy: np.ndarray, size: float, square: bool, **style):
    """Spots of ``size`` (data units) at ``xy``: squares (Visium HD bins) or circles, sized in
    data units so that they keep their true size at any figure size."""
    from matplotlib.collections import EllipseCollection, PolyCollection

    if square:
        # the squares' corners are in data units already: with an offset transform matplotlib
        # would take them as display pixels (and draw the slide off the axes)
        style.pop("offset_transform", None)
        corners = 0.5 * size * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
        return PolyCollection(xy[:, None, :] + corners[None], **style)
    n = len(xy)
    return EllipseCollection(
        np.full(n, size), np.full(n, size), np.zeros(n), units="xy", offsets=xy, **style
    )


def draw_spot_map(ax, adata, values, *, cmap, vmin, vmax, library_id=None, title=""):
    """One map of per-spot ``values`` on ``ax``: spots as circles of their true diameter (Visium
    HD bins as squares of their side) over the tissue image (if any); returns the spots'
    collection."""
    image, scalef, d = map_background(adata, library_id)
    side = io.square_bin_size(adata, library_id) if adata.uns.get("spatial") else None
    if side is not None:
        d = side * scalef
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)[:, :2] * scalef
    if image is not None:
        ax.imshow(image)
    ax.set_xlim(xy[:, 0].min() - 2 * d, xy[:, 0].max() + 2 * d)
    ax.set_ylim(xy[:, 1].max() + 2 * d, xy[:, 1].min() - 2 * d)
    ax.set_aspect("equal")
    ok = np.isfinite(values)
    square = side is not None
    sc = _spot_collection(
        xy[ok], d, square, offset_transform=ax.transData, cmap=cmap, alpha=0.9, linewidths=0
    )
    sc.set_array(values[ok])
    sc.set_clim(vmin, vmax)
    ax.add_collection(sc)
    if (~ok).any():
        ax.add_collection(
            _spot_collection(
                xy[~ok],
                d,
                square,
                offset_transform=ax.transData,
                facecolors="none",
                edgecolors="grey",
                linewidths=0.3,
            )
        )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return sc


def plot_cell_type_maps(
    adata, proportions: pd.DataFrame, out_dir, *, library_id=None, dpi=110
) -> list[Path]:
    """One PNG per cell type (proportion 0..1 on viridis over the image) and a dominant-type map."""
    plt = _figure()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in proportions.columns:
        fig, ax = plt.subplots(figsize=(5.5, 5), dpi=dpi)
        sc = draw_spot_map(
            ax,
            adata,
            proportions[name].to_numpy(float),
            cmap="viridis",
            vmin=0,
            vmax=1,
            library_id=library_id,
            title=f"{name}: proportion",
        )
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04)
        path = out_dir / f"map_{_safe(name)}.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    values = proportions.to_numpy(float)
    has = np.isfinite(values).all(1)
    dom = np.full(len(values), np.nan)
    dom[has] = values[has].argmax(1)
    fig, ax = plt.subplots(figsize=(6.8, 5), dpi=dpi)
    cmap = plt.get_cmap("tab20", len(proportions.columns))
    draw_spot_map(
        ax,
        adata,
        dom,
        cmap=cmap,
        vmin=-0.5,
        vmax=len(proportions.columns) - 0.5,
        library_id=library_id,
        title="dominant cell type",
    )
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=cmap(i), label=str(c))
        for i, c in enumerate(proportions.columns)
    ]
    ax.legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False
    )
    path = out_dir / "map_dominant_type.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
    return paths


def plot_truth_vs_estimate(
    adata, truth: pd.DataFrame, estimate: pd.DataFrame, path, *, library_id=None, dpi=90
) -> Path:
    """Rows = cell types, columns = truth | estimate, over the tissue image."""
    plt = _figure()
    types = list(truth.columns)
    fig, axes = plt.subplots(len(types), 2, figsize=(6, 2.9 * len(types)), dpi=dpi, squeeze=False)
    for i, t in enumerate(types):
        for j, (values, source) in enumerate(((truth, "truth"), (estimate, "STL NMF"))):
            draw_spot_map(
                axes[i, j],
                adata,
                values[t].to_numpy(float),
                cmap="viridis",
                vmin=0,
                vmax=1,
                library_id=library_id,
                title=f"{t} — {source}",
            )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
