"""Command line: ``stlnmf run`` (deconvolve a slide), ``stlnmf demo`` (bundled data) and
``stlnmf batch`` (many slides on a dask cluster: :mod:`.cli_batch`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ._constants import H5AD_COMPRESSION, MAX_CELLS_PER_TYPE
from ._constants import UNCERTAINTY_DRAWS as DEFAULT_DRAWS
from ._constants import UNCERTAINTY_LEVEL as DEFAULT_LEVEL
from .output_folder import check_output_folder, staged_results
from .preprocess import GENE_WEIGHTINGS
from .progress import Stage, stage_label


class _Progress:
    """tqdm bar per stage, driven by deconvolve's progress callback."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, i: int, n: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            if stage != Stage.DONE:
                desc = f"{stage_label(stage):>40}"
                self.bar = tqdm(total=n, desc=desc, leave=True, file=sys.stderr)
        if self.bar is not None:
            self.bar.total = n
            self.bar.n = i
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_results(
    result, out_dir, *, library_id=None, library_key=None, plots=True, previous=(), extras=None
) -> list[Path]:
    """``proportions.csv`` (by barcode), ``mrna_fractions.csv``, ``spot_qc.csv`` (with
    ``diagnose``: its diagnostics columns, and ``unexplained_regions.csv``; with
    ``uncertainty``: ``proportions_lower.csv`` and ``proportions_upper.csv``), ``result.h5ad``
    and maps (with ``library_key``: one folder of maps per library, as their coordinates may
    overlap). Everything is written under temporary names and renamed into place
    (:func:`~.output_folder.staged_results`); ``previous`` files that the new run does not
    replace are removed afterwards. ``extras``: ``{file name: writer(path)}`` written alike."""
    with staged_results(Path(out_dir), list(previous)) as (out, written):
        result.proportions.to_csv(out / "proportions.csv", index_label="barcode")
        result.mrna_fractions.to_csv(out / "mrna_fractions.csv", index_label="barcode")
        qc = pd.DataFrame({"fit_error": result.fit_error, "qc": result.qc})
        if getattr(result, "diagnostics", None) is not None:
            qc = qc.join(result.diagnostics)
            result.unexplained_regions.to_csv(out / "unexplained_regions.csv", index=False)
        qc.to_csv(out / "spot_qc.csv", index_label="barcode")
        if getattr(result, "uncertainty", None) is not None:
            result.uncertainty.lower.to_csv(out / "proportions_lower.csv", index_label="barcode")
            result.uncertainty.upper.to_csv(out / "proportions_upper.csv", index_label="barcode")
        if result.adata is not None:
            result.adata.write_h5ad(out / "result.h5ad", **H5AD_COMPRESSION)
            if plots:
                _plot_maps(result, out, library_id=library_id, library_key=library_key)
        for name, writer in (extras or {}).items():
            writer(out / name)
    return written


def _plot_maps(result, out: Path, *, library_id, library_key) -> None:
    """The PNG maps; a slide whose image cannot be drawn gets a warning, not a lost run (the
    tables are the results)."""
    from .errors import StlnmfError
    from .plotting import plot_cell_type_maps

    try:
        if library_key is None:
            plot_cell_type_maps(result.adata, result.proportions, out, library_id=library_id)
            return
        samples = result.adata.obs[library_key].astype(str)
        for name in pd.unique(samples):
            rows = (samples == name).to_numpy()
            images = result.adata.uns.get("spatial", {})
            folder = out / f"maps_{name}"
            folder.mkdir(exist_ok=True)
            plot_cell_type_maps(
                result.adata[rows],
                result.proportions[rows],
                folder,
                library_id=name if name in images else None,
            )
    except StlnmfError as exc:
        print(f"warning: maps not drawn: {exc}", file=sys.stderr)


def _proportion_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["unrolled", "classic"], default="unrolled")
    p.add_argument(
        "--train",
        dest="train",
        action="store_true",
        help="fine-tune the parameters on slides simulated on this slide (15 s - 3 min); "
        "default: the shipped (or --params) learned parameters",
    )
    p.add_argument(
        "--no-train", dest="train", action="store_false", help="do not fine-tune (the default)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=60,
        help="training epochs with --train (early stopping may end sooner)",
    )
    p.add_argument(
        "--layers", type=int, default=None, help="number of unrolled layers (default 100)"
    )
    p.add_argument(
        "--params", type=Path, default=None, help="parameter file saved by --save-params"
    )
    p.add_argument(
        "--save-params", type=Path, default=None, help="save the trained parameters here"
    )
    p.add_argument(
        "--fractions",
        choices=["cell", "mrna"],
        default="cell",
        help="report cell or mRNA fractions",
    )
    p.add_argument(
        "--min-proportion",
        type=_proportion_or_auto,
        default="auto",
        help="zero proportions below this; auto (default): 0.05, higher where spots hold "
        "one or two cells (read off the noise; needs a single-cell reference)",
    )
    p.add_argument(
        "--weighting",
        choices=list(GENE_WEIGHTINGS),
        default=None,
        help="data-term weights: nb = per spot and gene (the default), "
        "or one per gene (fitted, sqrt, mean, none); default: what the parameters were tuned with",
    )
    p.add_argument("--neighbors", type=int, default=6)
    p.add_argument(
        "--no-image", dest="use_image", action="store_false", help="graph from distances only"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="flag the spots the reference cannot explain (deviance z > 3), their regions and "
        "residual genes: columns of spot_qc.csv and unexplained_regions.csv",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="an interval per spot and type (parametric bootstrap, calibrated on simulations): "
        "proportions_lower.csv and proportions_upper.csv",
    )
    p.add_argument(
        "--uncertainty-draws",
        type=int,
        default=DEFAULT_DRAWS,
        help=f"with --uncertainty: resampled fits (default {DEFAULT_DRAWS})",
    )
    p.add_argument(
        "--uncertainty-level",
        type=float,
        default=DEFAULT_LEVEL,
        help=f"with --uncertainty: the intervals' coverage (default {DEFAULT_LEVEL})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (only its files are removed)",
    )


def _model_kwargs(a) -> dict:
    return {
        "method": a.method,
        "train": a.train,
        "train_epochs": a.epochs,
        "n_layers": a.layers,
        "params": a.params,
        "save_params": a.save_params,
        "fractions": a.fractions,
        "min_proportion": a.min_proportion,
        "n_neighbors": a.neighbors,
        "use_image": a.use_image,
        "seed": a.seed,
        "device": a.device,
        "gene_weighting": a.weighting,
        "diagnose": a.diagnose,
        "uncertainty": a.uncertainty,
        "uncertainty_draws": a.uncertainty_draws,
        "uncertainty_level": a.uncertainty_level,
    }


def _run(a) -> int:
    from . import deconvolve, io

    slide = io.read_slide(
        a.slide,
        coords=a.coords,
        image=a.image,
        scalefactor=a.scalefactor,
        spot_diameter=a.spot_diameter,
        library_id=a.library_id,
        bin_size=a.bin_size,
    )
    if a.image is not None:
        io.check_image_covers_spots(slide)
    cap = a.max_cells_per_type or None  # 0: every cell
    reference = io.read_reference(
        a.reference, cell_type_key=a.cell_type_key, max_cells_per_type=cap, seed=a.seed
    )
    previous = check_output_folder(a.out, overwrite=a.overwrite)  # before the computation
    bar = _Progress(not a.quiet)
    try:
        result = deconvolve(
            slide,
            reference,
            cell_type_key=a.cell_type_key,
            library_id=a.library_id,
            library_key=a.library_key,
            case_insensitive=a.case_insensitive,
            reference_is_means=a.reference_is_means,
            allow_non_integer_slide=a.allow_non_integer_slide,
            max_cells_per_type=cap,
            progress=bar,
            **_model_kwargs(a),
        )
    finally:
        bar.close()
    written = write_results(
        result, a.out, library_id=a.library_id, library_key=a.library_key, previous=previous
    )
    for name, info in result.info.get("libraries", {None: result.info}).items():
        _print_run(info, f"library {name}: " if name is not None else "")
    print(f"wrote {len(written)} files to {a.out}")
    return 0


def _print_run(info: dict, lead: str) -> None:
    print(
        lead + f"used {info['n_genes_used']} genes (of {info['n_shared_genes']} shared) and "
        f"{info['n_spots_used']} spots ({info['n_spots_empty']} without counts); "
        f"proportions are {info['fractions_meaning']}"
    )
    cells = info.get("cells_per_spot")
    print(
        f"proportions below {info['min_proportion']:.3g} set to zero"
        + (f" (~{cells:.1f} effective cells per spot, read off the noise)" if cells else "")
    )
    if info.get("train"):
        t = info["train"]
        rmse = f"{t['val_rmse_initial']:.4f} -> {t['val_rmse']:.4f}"
        print(f"training: validation RMSE {rmse} in {t['seconds']:.1f} s")


def _demo(a) -> int:
    from . import deconvolve
    from .datasets import DEMO_CELL_TYPE_KEY, TRUTH_KEY, load_demo
    from .metrics import score
    from .plotting import plot_truth_vs_estimate

    previous = check_output_folder(a.out, overwrite=a.overwrite)  # before the computation
    slide, reference = load_demo()
    truth = slide.obsm[TRUTH_KEY]
    bar = _Progress(not a.quiet)
    try:
        result = deconvolve(
            slide, reference, cell_type_key=DEMO_CELL_TYPE_KEY, progress=bar, **_model_kwargs(a)
        )
    finally:
        bar.close()
    ours = score(result.proportions[truth.columns].to_numpy(), truth.to_numpy())
    rows = {
        "STL NMF ("
        + a.method
        + (", fine-tuned" if a.train and a.method == "unrolled" else "")
        + ")": ours
    }
    rows["per-spot NNLS"] = score(_nnls_baseline(slide, reference, truth.columns), truth.to_numpy())
    table = pd.DataFrame(rows).T[["rmse", "jsd", "pearson", "rel_frobenius"]]
    size = f"{slide.n_obs} spots, {len(truth.columns)} cell types"
    print(f"\nDemo slide: {size}; scores against the true cell fractions")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    extras = {
        "truth_vs_estimate.png": lambda path: plot_truth_vs_estimate(
            result.adata, truth, result.proportions, path
        ),
        "demo_scores.json": lambda path: path.write_text(json.dumps(rows, indent=2)),
    }
    write_results(result, a.out, previous=previous, extras=extras)
    print(f"\nresults in {a.out}/ (proportions.csv, result.h5ad, map_*.png, truth_vs_estimate.png)")
    return 0


def _nnls_baseline(slide, reference, columns) -> np.ndarray:
    from .baselines import nnls_proportions

    est = nnls_proportions(slide, reference, cell_type_key="cell_type")
    return est[list(columns)].to_numpy()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stlnmf", description="Cell-type deconvolution of spatial transcriptomics (STL NMF)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="deconvolve a slide")
    run.add_argument(
        "--slide",
        required=True,
        type=Path,
        help=".h5ad, Space Ranger outs/ folder (Visium or Visium HD), or counts CSV/TSV "
        "(spots x genes)",
    )
    run.add_argument(
        "--bin-size",
        type=float,
        default=None,
        help="Visium HD: the bins to read, in µm (default 8; the square_XXXum/ folders present)",
    )
    run.add_argument(
        "--coords",
        type=Path,
        default=None,
        help="spot coordinates CSV (spot,x,y) for a counts table",
    )
    run.add_argument("--image", type=Path, default=None, help="tissue image for a counts table")
    run.add_argument(
        "--scalefactor", type=float, default=1.0, help="image pixels per coordinate unit"
    )
    run.add_argument(
        "--spot-diameter", type=float, default=None, help="spot diameter in coordinate units"
    )
    run.add_argument("--library-id", default=None, help="key of uns['spatial'] to use (one sample)")
    run.add_argument(
        "--library-key",
        default=None,
        help="obs column naming each spot's sample: each library is fitted on its own",
    )
    run.add_argument(
        "--reference",
        required=True,
        type=Path,
        help="single-cell .h5ad or signature table (genes x types)",
    )
    run.add_argument(
        "--cell-type-key",
        default=None,
        help="obs column of the single-cell reference with the cell types",
    )
    run.add_argument(
        "--case-insensitive", action="store_true", help="match gene names ignoring case"
    )
    run.add_argument(
        "--reference-is-means",
        action="store_true",
        help="the .h5ad reference's rows are mean expression (pseudo-bulks, metacells), "
        "not raw counts per cell: accept non-integer values",
    )
    run.add_argument(
        "--allow-non-integer-slide",
        action="store_true",
        help="accept slide counts that are not whole numbers (expected or ambient-corrected "
        "counts; never log-normalised ones)",
    )
    run.add_argument(
        "--max-cells-per-type",
        type=int,
        default=MAX_CELLS_PER_TYPE,
        help="keep a seeded sample of at most this many reference cells per type, read from "
        f"the .h5ad alone (default {MAX_CELLS_PER_TYPE}; 0 keeps every cell)",
    )
    run.add_argument("--out", required=True, type=Path)
    _add_model_options(run)
    demo = sub.add_parser(
        "demo", help="run on the bundled synthetic slide and report accuracy against its truth"
    )
    demo.add_argument("--out", type=Path, default=Path("results"))
    _add_model_options(demo)
    from .cli_batch import add_batch_parser

    add_batch_parser(sub)  # stlnmf batch: many slides on a dask cluster
    from .cli_tiled import add_tiled_parser

    add_tiled_parser(sub)  # stlnmf tiled: one large slide in tiles
    return parser


TRACEBACK_ENV = "STLNMF_TRACEBACK"  # set to 1 to see the traceback of an unexpected error


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one message, no traceback), 1 an unexpected error
    (one message; the traceback with ``STLNMF_TRACEBACK=1``), 130 interrupted."""
    import os

    from .errors import StlnmfError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "batch":
            from .cli_batch import run_batch

            return run_batch(args)
        if args.command == "tiled":
            from .cli_tiled import run_tiled

            return run_tiled(args)
        return _run(args) if args.command == "run" else _demo(args)
    except (StlnmfError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no result file was left half-written", file=sys.stderr)
        return 130
    except Exception as exc:  # a user sees one line, never a traceback
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(
            f"error: {type(exc).__name__}: {exc}\n(an input we do not check yet, or a bug: "
            f"please report it; {TRACEBACK_ENV}=1 shows where it happened)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
