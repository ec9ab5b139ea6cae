"""Learn the shipped default parameters (λ's, σ's, ω, the cell-fraction head's α; no gene
weights) on many simulated slides.

    python benchmarks/train_defaults.py --gene-weighting nb --out layers.pt   # the layers
    python benchmarks/train_defaults.py --gene-weighting nb --head-only layers.pt
        # then the cell-fraction head on them; writes src/napari_stlnmf/data/default_params.pt

Slides come from synthetic references of 5-30 types on hexagonal and square layouts with all
three kinds of proportions, several depths and platform effects. Gene weights are not learned:
they are specific to a reference, and users who train get their own.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parents[1]


def groups(seed=0, gene_weighting="sqrt"):
    from napari_stlnmf.datasets import hex_layout, make_reference
    from napari_stlnmf.graph import build_graph
    from napari_stlnmf.preprocess import build_reference, prepare
    from napari_stlnmf.train import make_training_slides

    rng = np.random.default_rng(seed)
    out = []
    for i, n_types in enumerate([5, 8, 12, 20, 30, 10]):
        ref = build_reference(
            make_reference(
                n_types=n_types, n_genes=max(600, 25 * n_types), cells_per_type=80, seed=500 + i
            ),
            cell_type_key="cell_type",
        )
        if i % 2:
            xy = hex_layout(28, 28)
        else:
            g = np.arange(26)
            xy = np.column_stack([np.repeat(g, 26), np.tile(g, 26)]).astype(float) * 100
        graph = build_graph(xy)
        depth = float(rng.choice([1000, 3000, 10000]))
        # prepare on a pilot simulation to pick genes and scales the way deconvolve would
        slides = make_training_slides(
            xy,
            graph,
            ref,
            n_slides=4,
            max_spots=700,
            library_sizes=np.full(10, depth),
            seed=seed + i,
        )
        X_pilot = np.vstack([s.X.numpy() for s in slides]) * depth
        prep = prepare(X_pilot, ref.genes, ref, gene_weighting=gene_weighting)
        sel = ref.subset_genes(prep.genes)
        slides = make_training_slides(
            xy,
            graph,
            sel,
            n_slides=4,
            max_spots=700,
            library_sizes=np.full(10, depth),
            seed=seed + 10 + i,
        )
        out.append((prep, slides, overdispersion(prep) if gene_weighting == "nb" else 0.0))
    return out


def overdispersion(prep) -> float:
    """φ measured on the pilot as deconvolve measures it on a slide (quick first fit)."""
    from napari_stlnmf.calibration import estimate_noise, quick_fit

    V = quick_fit(prep, np.arange(prep.X.shape[0]))
    return estimate_noise(prep.X, prep.library_size, prep.B, V).overdispersion


def main(
    epochs: int = 40,
    gene_weighting: str = "sqrt",
    out_path: str | None = None,
    head_from: str | None = None,
):
    from napari_stlnmf.api import default_params_path
    from napari_stlnmf.model import DEFAULTS, REFRESH_LAYERS, EntryNoise, UnrolledNMF
    from napari_stlnmf.train import stack_slides

    torch.manual_seed(0)
    t0 = time.perf_counter()
    data = groups(gene_weighting=gene_weighting)
    if (
        head_from
    ):  # the layers as they are; learn the cell-fraction head on the output as users get it
        model, _ = UnrolledNMF.load(head_from)
        model.log_gene_weight.requires_grad_(False)
        with (
            torch.no_grad()
        ):  # start the head where a fresh model does (a file without one loads as α ≈ 0)
            model.log_cell_smoothing.fill_(float(np.log(DEFAULTS.cell_smoothing)))
        params = [model.log_cell_smoothing, model.raw_cell_sigma]
    else:
        model = UnrolledNMF(1, 1, learn_gene_weights=False, omega=DEFAULTS.omega_start)
        if gene_weighting == "nb":
            model.refresh_layers = REFRESH_LAYERS
        params = [model.log_lambda, model.raw_sigma, model.raw_omega]
    zeroed = head_from is not None
    opt = torch.optim.Adam(params, lr=0.05)
    batches = [
        (
            torch.as_tensor(p.B),
            torch.as_tensor(p.gene_weights),
            torch.as_tensor(p.mrna_content, dtype=torch.float32),
            stack_slides(sl[:3]),
            stack_slides(sl[3:]),
            phi,
        )
        for p, sl, phi in data
    ]

    def loss_on(which):
        total = 0.0
        for B, g, c, tr, va, phi in batches:
            b = tr if which == "train" else va
            model.log_type_weight = torch.nn.Parameter(torch.zeros(B.shape[1]), requires_grad=False)
            model.log_gene_weight = torch.nn.Parameter(torch.zeros(B.shape[0]), requires_grad=False)
            V = model(
                b.X,
                B,
                g,
                b.graph,
                noise=EntryNoise(b.library_size, phi) if model.entry_weights else None,
            )
            cells = model.cell_fractions(V, c, b.graph)
            # as deconvolve's output: below 0.05 zeroed (the mask is a constant for the gradient)
            if zeroed:
                keep = ((cells >= 0.05) | (cells == cells.max(1, keepdim=True).values)).detach()
                cells = cells * keep
                cells = cells / cells.sum(1, keepdim=True)
            total = total + ((cells - b.truth) ** 2).mean()
        return total / len(batches)

    with torch.no_grad():
        start = float(loss_on("val").sqrt())
    keys = (
        ("log_cell_smoothing", "raw_cell_sigma")
        if head_from
        else ("log_lambda", "raw_sigma", "raw_omega")
    )
    best, best_state = (
        start,
        {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys},
    )
    for epoch in range(epochs):
        opt.zero_grad()
        loss = loss_on("train")
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = float(loss_on("val").sqrt())
        if val < best:
            best, best_state = (
                val,
                {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys},
            )
        print(f"epoch {epoch + 1}: train {float(loss.sqrt()):.4f} val {val:.4f}", flush=True)
    out = UnrolledNMF(1, 1, learn_gene_weights=False)
    out.refresh_layers = model.refresh_layers
    with torch.no_grad():
        for k in ("log_lambda", "raw_sigma", "raw_omega", "log_cell_smoothing", "raw_cell_sigma"):
            getattr(out, k).copy_(best_state[k] if k in best_state else getattr(model, k))
    path = Path(out_path) if out_path else default_params_path()
    out.save(
        path,
        extra={
            "gene_weighting": gene_weighting,
            "trained_on": "6 synthetic references (5-30 types), hex and square layouts",
            "val_rmse_initial": start,
            "val_rmse": best,
            "seconds": time.perf_counter() - t0,
        },
    )
    print(f"validation RMSE {start:.4f} -> {best:.4f}; {out.describe()}; wrote {path}")


if __name__ == "__main__":
    import argparse

    # the summary sentence, unwrapped
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("epochs", nargs="?", type=int, default=40)
    ap.add_argument("--gene-weighting", default="sqrt", choices=["sqrt", "nb", "mean", "none"])
    ap.add_argument(
        "--out", default=None, help="parameter file to write (default: the shipped one)"
    )
    ap.add_argument(
        "--head-only",
        default=None,
        metavar="PARAMS",
        help="keep the layers of this parameter file and learn only the cell-fraction head "
        "(on cell fractions zeroed below 0.05, as deconvolve reports them)",
    )
    a = ap.parse_args()
    if (
        a.gene_weighting not in ("sqrt", "nb") and a.out is None
    ):  # the shipped file is what untrained runs use
        ap.error("--out is required with --gene-weighting mean or none")
    main(a.epochs, a.gene_weighting, a.out, a.head_only)
