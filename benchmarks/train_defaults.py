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


MISMATCH_SETS = ("seqfish_ob", "osmfish_ss")


def groups(seed=0, gene_weighting="sqrt", mismatch=()):
    """Training groups: (prepared reference, 4 slides, φ) per reference and layout.

    The six synthetic references build their slides from their own cells (as fine-tuning
    does). Each name in ``mismatch`` adds two groups from that real set's reference cells,
    split in two halves per type: one half is the reference, the other builds the slides, so
    the slides' cells are not the reference's (a rare type's profile misses its slide cells,
    subtypes differ in share, cells differ in size) — what real tissue shows and our own
    simulations never did.
    """
    from napari_stlnmf.datasets import make_reference
    from napari_stlnmf.preprocess import build_reference

    rng = np.random.default_rng(seed)
    out = []
    for i, n_types in enumerate([5, 8, 12, 20, 30, 10]):
        ref = build_reference(
            make_reference(
                n_types=n_types, n_genes=max(600, 25 * n_types), cells_per_type=80, seed=500 + i
            ),
            cell_type_key="cell_type",
        )
        depth = float(rng.choice([1000, 3000, 10000]))
        out.append(_group(ref, ref, i, depth, seed + i, gene_weighting))
    for j, name in enumerate(mismatch):
        from near_pure import real_halves

        for k in range(2):
            ref_cells, slide_cells = real_halves(name, seed=100 + 2 * j + k)
            ref = build_reference(ref_cells, cell_type_key="cell_type")
            depth = float(rng.choice([1000, 3000, 10000]))
            i = 6 + 2 * j + k
            out.append(_group(ref, slide_cells, i, depth, seed + i, gene_weighting))
    return out


def _group(ref, slide_cells, i, depth, seed, gene_weighting):
    """Slides simulated from ``slide_cells`` on a hex (odd i) or square layout; genes and
    scales chosen from ``ref`` on a pilot simulation, the way deconvolve would."""
    from napari_stlnmf.datasets import hex_layout
    from napari_stlnmf.graph import build_graph
    from napari_stlnmf.preprocess import prepare
    from napari_stlnmf.train import make_training_slides

    if i % 2:
        xy = hex_layout(28, 28)
    else:
        g = np.arange(26)
        xy = np.column_stack([np.repeat(g, 26), np.tile(g, 26)]).astype(float) * 100
    graph = build_graph(xy)
    sim = {"n_slides": 4, "max_spots": 700, "library_sizes": np.full(10, depth)}
    slides = make_training_slides(xy, graph, slide_cells, seed=seed, **sim)
    X_pilot = np.vstack([s.X.numpy() for s in slides]) * depth
    prep = prepare(X_pilot, slide_cells.genes, ref, gene_weighting=gene_weighting)
    sel = slide_cells.subset_genes(prep.genes)
    slides = make_training_slides(xy, graph, sel, seed=seed + 10, **sim)
    return prep, slides, overdispersion(prep) if gene_weighting == "nb" else 0.0


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
    mismatch: tuple[str, ...] = (),
):
    from napari_stlnmf.api import default_params_path
    from napari_stlnmf.model import DEFAULTS, REFRESH_LAYERS, EntryNoise, UnrolledNMF
    from napari_stlnmf.train import stack_slides

    torch.manual_seed(0)
    t0 = time.perf_counter()
    data = groups(gene_weighting=gene_weighting, mismatch=mismatch)
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

    def group_losses(which):
        """Per group, the mean squared error of cell fractions on its train or val slides."""
        out = []
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
            out.append(((cells - b.truth) ** 2).mean())
        return out

    with torch.no_grad():
        first = {w: [float(x) for x in group_losses(w)] for w in ("train", "val")}

    def loss_on(which):
        losses = group_losses(which)
        if mismatch:
            # each group relative to where it started: the mismatched groups' errors are
            # several times the synthetic ones' and would otherwise decide alone
            scaled = [x / f for x, f in zip(losses, first[which], strict=True)]
            return sum(scaled) / len(scaled) * (sum(first[which]) / len(losses))
        return sum(losses) / len(losses)

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
            "trained_on": "6 synthetic references (5-30 types), hex and square layouts"
            + (f"; other cells than the reference's: {', '.join(mismatch)}" if mismatch else ""),
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
        "--mismatch",
        default="",
        help="comma-separated real sets of ../shared/data whose reference cells, split in two "
        f"halves, add slides whose cells are not the reference's (e.g. {','.join(MISMATCH_SETS)})",
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
    mismatch = tuple(m for m in a.mismatch.split(",") if m)
    main(a.epochs, a.gene_weighting, a.out, a.head_only, mismatch)
