"""``stlnmf batch``: many slides, one reference, on a dask.distributed cluster
(:func:`napari_stlnmf.distributed.deconvolve_many`)."""

from __future__ import annotations

from pathlib import Path

from ._constants import MAX_CELLS_PER_TYPE
from .errors import StlnmfError

# exit code when every slide could be read but some failed (the others' results are written)
EXIT_SOME_FAILED = 1


def add_batch_parser(sub) -> None:
    from .cli import _add_model_options

    batch = sub.add_parser(
        "batch",
        help="deconvolve many slides with one reference on a dask cluster (local by default)",
        description="One task per slide on a dask.distributed cluster; each slide's results in "
        "OUT/<slide>/ as it finishes; a re-run skips the slides done with the same options.",
    )
    batch.add_argument(
        "--slides",
        required=True,
        type=Path,
        help="text file of slide paths, one a line (.h5ad, Space Ranger outs/ folders, ...; "
        "relative paths from the file's folder; '#' comments); named by their file stems",
    )
    batch.add_argument(
        "--reference",
        required=True,
        type=Path,
        help="single-cell .h5ad or signature table (genes x types)",
    )
    batch.add_argument("--cell-type-key", default=None, help="obs column with the cell types")
    batch.add_argument("--out", required=True, type=Path, help="folder; one subfolder per slide")
    where = batch.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local worker processes, one thread each (default: one per core)",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask scheduler (tcp://host:8786), e.g. one started by "
        "dask-jobqueue on SLURM; slide paths must be visible to its workers",
    )
    batch.add_argument(
        "--max-cells-per-type",
        type=int,
        default=MAX_CELLS_PER_TYPE,
        help=f"reference cells kept per type, a seeded sample (default {MAX_CELLS_PER_TYPE}; "
        "0 keeps every cell)",
    )
    batch.add_argument("--bin-size", type=float, default=None, help="Visium HD bins, in µm")
    batch.add_argument(
        "--retries", type=int, default=1, help="reruns of a task after an unexpected error"
    )
    batch.add_argument("--no-maps", dest="maps", action="store_false", help="no PNG maps")
    _add_model_options(batch)


def read_slide_list(path: Path) -> list[Path]:
    """The slide paths of a list file: one a line, blank lines and '#' comments skipped,
    relative paths taken from the list file's folder; each must exist."""
    path = Path(path)
    if not path.is_file():
        raise StlnmfError(
            f"--slides {str(path)!r} is not a file: give a text file with one slide path a line"
        )
    slides, missing = [], []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        slide = Path(line).expanduser()
        slide = slide if slide.is_absolute() else path.parent / slide
        (slides if slide.exists() else missing).append(slide)
    if missing:
        shown = ", ".join(str(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise StlnmfError(
            f"{len(missing)} slide path(s) listed in {str(path)!r} do not exist: {shown}. "
            "Correct the list (relative paths are read from the list file's folder)"
        )
    if not slides:
        raise StlnmfError(f"{str(path)!r} lists no slide: give one slide path a line")
    return slides


def run_batch(a) -> int:
    import pandas as pd

    from .cli import _model_kwargs
    from .distributed import deconvolve_many

    if a.save_params is not None:
        raise StlnmfError(
            "--save-params is not taken by `stlnmf batch` (every slide would write the file): "
            "train on one slide with `stlnmf run --train --save-params`, then pass --params"
        )
    if a.workers is not None and a.workers < 1:
        raise StlnmfError(f"--workers {a.workers}: give at least 1 worker")
    slides = read_slide_list(a.slides)
    options = _model_kwargs(a)
    options.pop("save_params")
    client = None
    if a.scheduler is not None:
        from .distributed import _require_distributed

        client = _require_distributed().Client(a.scheduler)
    try:
        batch = deconvolve_many(
            slides,
            a.reference,
            cell_type_key=a.cell_type_key,
            client=client,
            workers=a.workers,
            out=a.out,
            overwrite=a.overwrite,
            retries=a.retries,
            maps=a.maps,
            progress=not a.quiet,
            max_cells_per_type=a.max_cells_per_type or None,
            bin_size=a.bin_size,
            **options,
        )
    finally:
        if client is not None:
            client.close()
    table = batch.summary.copy()
    table["seconds"] = table["seconds"].map(lambda s: "" if pd.isna(s) else f"{s:.1f}")
    table["spots"] = table["spots"].map(lambda n: "" if pd.isna(n) else str(int(n)))
    print(table.to_string(index=False))
    failed = batch.failed
    done = len(table) - len(failed)
    print(f"\n{done} of {len(table)} slides have results in {a.out}/<slide>/")
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}; fix them and run the same command "
              "again (the slides done are skipped)")  # fmt: skip
        return EXIT_SOME_FAILED
    return 0
