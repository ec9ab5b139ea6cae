"""``stlnmf tiled``: one slide too large for one fit, in spatial tiles, in this process or on a
dask.distributed cluster (:func:`napari_stlnmf.tiling.deconvolve_tiled`)."""

from __future__ import annotations

from pathlib import Path

from ._constants import CALIBRATION_SPOTS, MAX_CELLS_PER_TYPE
from ._constants import TILE_HALO as DEFAULT_HALO
from ._constants import TILE_SIZE as DEFAULT_TILE_SIZE
from .errors import StlnmfError


def add_tiled_parser(sub) -> None:
    from .cli import _add_model_options

    tiled = sub.add_parser(
        "tiled",
        help="deconvolve one large slide (Visium HD at 2 µm) in spatial tiles",
        description="The slide-wide calibration measured once on a seeded sample of bins; then "
        "square tiles, each fitted with a halo of neighbours and keeping its interior; a "
        "Visium HD .h5 matrix is read a tile at a time. Tiles run one after another here, or as "
        "tasks on a dask cluster (--workers, --scheduler).",
    )
    tiled.add_argument(
        "--slide",
        required=True,
        type=Path,
        help="Visium HD folder (sample, outs/, binned_outputs/ or square_XXXum/), or any slide "
        "`stlnmf run` reads (read whole, then cut)",
    )
    tiled.add_argument("--bin-size", type=float, default=None, help="Visium HD bins, in µm")
    tiled.add_argument(
        "--reference", required=True, type=Path, help="single-cell .h5ad or signature table"
    )
    tiled.add_argument("--cell-type-key", default=None, help="obs column with the cell types")
    tiled.add_argument("--out", required=True, type=Path)
    tiled.add_argument(
        "--tile-size",
        type=int,
        default=DEFAULT_TILE_SIZE,
        help=f"tile side in bins (default {DEFAULT_TILE_SIZE}: ~0.5 M bins a task)",
    )
    tiled.add_argument(
        "--halo",
        type=int,
        default=DEFAULT_HALO,
        help=f"graph hops of neighbours fitted with each tile (default {DEFAULT_HALO}); -1: "
        "the exact halo, beyond which no bin can change a tile's answer",
    )
    tiled.add_argument(
        "--calibration-spots",
        type=int,
        default=CALIBRATION_SPOTS,
        help=f"seeded sample the calibration is measured on (default {CALIBRATION_SPOTS:,})",
    )
    where = tiled.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, default=None, help="a local dask cluster of this many processes"
    )
    where.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask scheduler (tcp://host:8786); the slide must be "
        "visible to its workers at the same path",
    )
    tiled.add_argument(
        "--max-cells-per-type",
        type=int,
        default=MAX_CELLS_PER_TYPE,
        help=f"reference cells kept per type (default {MAX_CELLS_PER_TYPE}; 0: every cell)",
    )
    tiled.add_argument("--library-id", default=None, help="key of uns['spatial'] to use")
    _add_model_options(tiled)


def run_tiled(a) -> int:
    from .cli import _model_kwargs, _print_run, _Progress, write_results
    from .output_folder import check_output_folder
    from .tiling import deconvolve_tiled

    if a.workers is not None and a.workers < 1:
        raise StlnmfError(f"--workers {a.workers}: give at least 1 worker")
    options = _model_kwargs(a)
    previous = check_output_folder(a.out, overwrite=a.overwrite)  # before the computation
    client = cluster = None
    if a.workers is not None or a.scheduler is not None:
        from .distributed import _local_cluster, _require_distributed

        distributed = _require_distributed()
        if a.scheduler is not None:
            client = distributed.Client(a.scheduler)
        else:
            cluster = _local_cluster(distributed, a.workers)
            client = distributed.Client(cluster)
    bar = _Progress(not a.quiet)
    try:
        result = deconvolve_tiled(
            a.slide,
            a.reference,
            cell_type_key=a.cell_type_key,
            tile_size=a.tile_size,
            halo=None if a.halo == -1 else a.halo,
            client=client,
            calibration_spots=a.calibration_spots,
            bin_size=a.bin_size,
            library_id=a.library_id,
            max_cells_per_type=a.max_cells_per_type or None,
            progress=bar,
            **options,
        )
    finally:
        bar.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    written = write_results(result, a.out, library_id=a.library_id, previous=previous)
    _print_run(result.info, "")
    tiling = result.info["tiling"]
    print(
        f"{tiling['tiles']} tiles of {tiling['tile_size']} bins, halo {tiling['halo_hops']} "
        f"hops, calibrated on {tiling['calibration_spots']:,} bins"
    )
    print(f"wrote {len(written)} files to {a.out}")
    return 0
