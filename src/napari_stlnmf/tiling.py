"""One slide too large for one fit, in spatial tiles: :func:`deconvolve_tiled`.

The slide-wide steps (gene selection, platform effect, noise, zeroing threshold, image-feature
scale, per-entry Gram scales) are measured once, on a seeded sample of the slide's spots
(:class:`~napari_stlnmf.calibration.FixedCalibration`). The slide is then cut into square tiles;
each is fitted with its halo (the spots within ``halo`` graph hops of it, so that its own spots
see the neighbours they would see in the whole slide) and keeps only its interior. A tile reads
only its own bins (a Visium HD ``.h5`` matrix is read a run of barcodes at a time), in this
process or as a task on a ``dask.distributed`` client.

With a halo of at least the model's layers plus the cell-fraction head's smoothing steps every
interior spot's answer is exactly the whole-slide answer under the same calibration; the
graph's influence decays over far fewer hops than that, so the default halo is set from a
measurement (``docs/bench_tiled.md``, ``benchmarks/tiled_slide.py``).
"""

from __future__ import annotations

import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import io
from ._constants import CALIBRATION_SPOTS, SPATIAL_KEY, TILE_HALO, TILE_SIZE
from .calibration import sample_rows
from .errors import InvalidCountsError, StlnmfError
from .model import CELL_SMOOTHING_STEPS
from .pipeline import (
    DeconvolutionSettings,
    FixedCalibration,
    Fractions,
    slide_libraries,
)
from .progress import Stage, check_stop, report

__all__ = [
    "DEFAULT_HALO",
    "DEFAULT_TILE_SIZE",
    "SlideSource",
    "Tile",
    "deconvolve_tiled",
    "exact_halo",
    "open_slide_source",
    "plan_tiles",
]

DEFAULT_TILE_SIZE = TILE_SIZE
DEFAULT_HALO = TILE_HALO
# options a tiled run cannot honour: slide-wide by nature, or written by every tile
_NOT_TILED = {
    "train": "fine-tune on a crop with deconvolve(..., train=True, save_params=PATH), then pass "
    "params=PATH",
    "save_params": "fine-tune on a crop with deconvolve(..., save_params=PATH)",
    "diagnose": "diagnose a crop with deconvolve(..., diagnose=True)",
    "uncertainty": "take intervals on a crop with deconvolve(..., uncertainty=True)",
    "library_key": "deconvolve one library at a time (library_id=)",
}


@dataclass(frozen=True)
class Tile:
    """A square of the slide: ``interior`` the spots it answers for, ``rows`` those and its
    halo, both positions among the slide's spots (sorted)."""

    index: int
    interior: np.ndarray
    rows: np.ndarray


def exact_halo(n_layers: int) -> int:
    """Hops after which a spot cannot affect another: each layer reaches one hop, then the
    cell-fraction head's smoothing steps, plus one for the graph's edges at the halo's rim."""
    return int(n_layers) + CELL_SMOOTHING_STEPS + 1


def plan_tiles(
    xy: np.ndarray, spacing: float, *, tile_size: int, halo: int, max_edge: float = 1.5
) -> list[Tile]:
    """Square tiles of ``tile_size`` spot spacings over the spots ``xy``, each with the spots
    within ``halo`` hops (a hop is at most ``max_edge`` spacings, the graph's longest edge)
    on every side. Tiles without spots are left out."""
    if tile_size < 1 or halo < 0:
        raise StlnmfError(f"tile_size must be >= 1 and halo >= 0 (got {tile_size}, {halo})")
    xy = np.asarray(xy, dtype=np.float64)
    side = tile_size * spacing
    origin = xy.min(0)
    cell = np.floor((xy - origin) / side).astype(np.int64)
    n_cols = int(cell[:, 0].max()) + 1
    label = cell[:, 1] * n_cols + cell[:, 0]
    margin = halo * max_edge * spacing
    tiles = []
    order = np.argsort(label, kind="stable")
    labels, starts = np.unique(label[order], return_index=True)
    for k, (lab, start) in enumerate(zip(labels, starts)):
        stop = starts[k + 1] if k + 1 < len(starts) else len(order)
        interior = np.sort(order[start:stop])
        r, c = divmod(int(lab), n_cols)
        lo = origin + np.array([c, r]) * side - margin
        hi = origin + np.array([c + 1, r + 1]) * side + margin
        inside = np.flatnonzero(((xy >= lo) & (xy < hi)).all(1))
        tiles.append(Tile(len(tiles), interior, inside))
    return tiles


class SlideSource:
    """A slide's spots, positions and images (``meta``: an AnnData without counts) and a way to
    read the counts of some of its spots (:meth:`part`), without holding all of them.

    ``reader``: an object with ``read(rows) -> spots x genes CSR`` (a Visium HD ``.h5``:
    :class:`~napari_stlnmf.io.spaceranger.TenxH5Columns`), or None when ``slide`` (an AnnData
    in memory) holds the counts. Pickles without the images (``uns``), which travel once."""

    def __init__(self, meta, reader=None, slide=None):
        self.meta, self.reader, self.slide = meta, reader, slide

    @property
    def n_spots(self) -> int:
        return self.meta.n_obs

    def part(self, rows: np.ndarray, uns: dict | None = None):
        """An AnnData of the spots ``rows`` with their counts (and ``uns``, default the
        slide's)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.slide is not None:
            part = self.slide[rows].copy()
        else:
            part = self.meta[rows].copy()
            part.X = self.reader.read(rows)
        part.uns = dict(self.meta.uns if uns is None else uns)
        return part

    def without_images(self) -> SlideSource:
        """The same source with ``uns`` emptied (what a tile task is sent; its ``uns`` is
        scattered once)."""
        meta = self.meta.copy() if self.slide is None else self.meta
        meta.uns = {}
        slide = None
        if self.slide is not None:
            slide = self.slide.copy()
            slide.uns = {}
        return SlideSource(meta, self.reader, slide)


def open_slide_source(slide, *, bin_size: float | None = None, library_id=None) -> SlideSource:
    """A :class:`SlideSource` of ``slide``: a Visium HD folder (its bins' counts read from the
    ``.h5`` matrix a tile at a time), another path (read whole by
    :func:`~napari_stlnmf.io.read_slide`) or an AnnData."""
    import anndata as ad

    if isinstance(slide, (str, Path)):
        path = Path(slide)
        fmt = io.find_slide_format(path)
        if fmt is not None and fmt.name == "visium_hd":
            meta, reader = io.visium_hd.open_bins(path, bin_size=bin_size, library_id=library_id)
            return SlideSource(meta, reader)
        slide = io.read_slide(path, bin_size=bin_size)
    if not isinstance(slide, ad.AnnData):
        raise StlnmfError(
            f"deconvolve_tiled takes an AnnData or a path to a slide, not {type(slide).__name__}"
        )
    io.validate_slide(slide, allow_non_integer=True)
    meta = ad.AnnData(obs=slide.obs.copy(), var=slide.var.copy(), uns=dict(slide.uns))
    meta.obsm[SPATIAL_KEY] = np.asarray(slide.obsm[SPATIAL_KEY])
    return SlideSource(meta, None, slide)


@dataclass
class _TileAnswer:
    """A tile's interior: positions in the slide, fractions, fit error, qc, its warnings."""

    rows: np.ndarray
    cell: np.ndarray
    mrna: np.ndarray
    fit_error: np.ndarray
    qc: np.ndarray
    warnings: list[str]
    seconds: float


def _fit_tile(source, uns, tile: Tile, reference, settings, fixed: FixedCalibration):
    """One tile with its halo, fitted under the slide's calibration; its interior kept."""
    from .api import _fit_library

    t0 = time.perf_counter()
    n_types = len(fixed.info["cell_types"])
    cell = np.full((len(tile.interior), n_types), np.nan)
    mrna = np.full_like(cell, np.nan)
    error = np.full(len(tile.interior), np.nan)
    qc = np.full(len(tile.interior), "no counts", dtype=object)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        part = source.part(tile.rows, uns)
        try:
            fit = _fit_library(part, reference, settings, fixed=fixed)
        except InvalidCountsError:  # no spot of the tile has counts on the genes used
            fit = None
    if fit is not None:
        kept = tile.rows[fit.prep.spot_mask]
        # interior positions among the fitted spots: both sorted, the interior a subset
        at = np.searchsorted(kept, tile.interior)
        found = (at < len(kept)) & (kept[np.minimum(at, len(kept) - 1)] == tile.interior)
        cell[found] = fit.fractions.cell[at[found]]
        mrna[found] = fit.fractions.mrna[at[found]]
        error[found] = fit.fractions.fit_error[at[found]]
        qc[found] = "ok"
    # spots without counts are reported per spot in qc, not once per tile
    messages = sorted({str(w.message) for w in caught if "no counts on" not in str(w.message)})
    return _TileAnswer(tile.interior, cell, mrna, error, qc, messages, time.perf_counter() - t0)


def deconvolve_tiled(
    slide,
    reference,
    *,
    cell_type_key: str | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    halo: int | None = DEFAULT_HALO,
    client=None,
    calibration_spots: int = CALIBRATION_SPOTS,
    bin_size: float | None = None,
    progress=None,
    should_stop=None,
    **options,
):
    """Deconvolve a slide too large for one fit (a Visium HD slide at 2 µm) in spatial tiles.

    Parameters
    ----------
    slide
        A Visium HD folder (its ``.h5`` matrix is read a tile at a time: memory holds one
        tile's counts per task), another slide path (read whole, then cut) or an AnnData.
    reference, cell_type_key, bin_size, **options
        As for :func:`~napari_stlnmf.deconvolve` (``train``, ``save_params``, ``diagnose``,
        ``uncertainty`` and ``library_key`` are refused: fine-tune or diagnose on a crop).
    tile_size
        Side of a tile in spot spacings (bins): 700 is ~0.5 M bins per task with its halo.
    halo
        Graph hops of neighbours fitted with each tile and dropped afterwards. ``None``: the
        exact halo (:func:`exact_halo`: the layers plus the head's steps), beyond which no spot
        can change the interior (104 hops with the shipped 100 layers). The default, 16, is
        twice the halo at which a 10^6-bin slide's tiles already matched the exact halo to float
        precision (``docs/bench_tiled.md``), at a quarter of its cost.
    client
        A ``distributed.Client``: each tile a task (the reference, the calibration and the
        images scattered once). ``None``: the tiles one after another in this process.
    calibration_spots
        Size of the seeded sample of spots the slide-wide steps are measured on.

    Returns
    -------
    DeconvolutionResult
        As :func:`~napari_stlnmf.deconvolve`'s; ``result.adata`` holds no counts (the slide's
        ``obs``, positions, images and the results); ``info['tiling']`` says how it was cut.
    """
    from .api import _fit_library, _LibraryFit, _result, slide_reference
    from .checks import check_callbacks

    t_start = time.perf_counter()
    check_callbacks(progress, should_stop)
    refused = sorted(k for k in _NOT_TILED if options.get(k) not in (None, False))
    if refused:
        raise StlnmfError(
            f"a tiled run cannot take {refused[0]}=: {_NOT_TILED[refused[0]]} "
            "(the tiles share one calibration and parameters)"
        )
    if not isinstance(calibration_spots, (int, np.integer)) or calibration_spots < 100:
        raise StlnmfError(
            f"calibration_spots must be a whole number >= 100, not {calibration_spots!r}"
        )
    settings = DeconvolutionSettings(**options)
    seed = int(settings.seed)
    report(progress, Stage.READING, 0, 1)
    source = open_slide_source(slide, bin_size=bin_size, library_id=settings.library_id)
    meta = source.meta
    library_id, _ = (
        io.get_library(meta, settings.library_id) if "spatial" in meta.uns else (None, None)
    )
    settings = replace(settings, library_id=library_id)
    ref = slide_reference(reference, cell_type_key, meta, settings)
    (library,) = slide_libraries(meta, settings)  # one: library_key is refused above
    tissue = library.rows
    tissue_rows = np.flatnonzero(tissue)
    xy = np.asarray(meta.obsm[SPATIAL_KEY], dtype=np.float64)[tissue_rows, :2]
    check_stop(should_stop)

    # the slide-wide steps, once, on a seeded sample of the tissue's spots
    report(progress, Stage.PLATFORM, 0, 1)
    sample = tissue_rows[sample_rows(len(tissue_rows), int(calibration_spots), seed)]
    n_sample = len(sample)
    calibrated = _fit_library(source.part(sample), ref, settings, keep_calibration=True)
    fixed = calibrated.kept_calibration
    check_stop(should_stop)

    spacing = _spacing(meta, library_id, xy)
    hops = exact_halo(_n_layers(calibrated)) if halo is None else int(halo)
    tiles = plan_tiles(xy, spacing, tile_size=int(tile_size), halo=hops)
    tiles = [Tile(t.index, tissue_rows[t.interior], tissue_rows[t.rows]) for t in tiles]
    answers = _run_tiles(source, tiles, ref, settings, fixed, client, progress, should_stop)

    # the tiles' interiors into one result, as deconvolve's for one library
    ok = np.zeros(meta.n_obs, bool)
    n_types = len(fixed.info["cell_types"])
    cell = np.full((meta.n_obs, n_types), np.nan)
    mrna, error = np.full_like(cell, np.nan), np.full(meta.n_obs, np.nan)
    for a in answers:
        good = a.qc == "ok"
        ok[a.rows[good]] = True
        cell[a.rows], mrna[a.rows], error[a.rows] = a.cell, a.mrna, a.fit_error
    for message in sorted({m for a in answers for m in a.warnings}):
        warnings.warn(f"a tile: {message}", RuntimeWarning, stacklevel=2)
    kept = ok[tissue]
    info = dict(calibrated.info)
    info["tiling"] = {
        "tiles": len(tiles),
        "tile_size": int(tile_size),
        "halo_hops": hops,
        "exact_halo_hops": exact_halo(_n_layers(calibrated)),
        "calibration_spots": n_sample,
        "spacing": float(spacing),
        "tile_seconds": [round(a.seconds, 3) for a in answers],
    }
    info["graph"] = {**info["graph"], "n_edges": None, "built": "per tile, with its halo"}
    info["n_spots_used"] = int(ok.sum())
    info["n_spots_empty"] = int(tissue.sum() - ok.sum())
    whole = _LibraryFit(
        prep=_Kept(kept),
        fractions=Fractions(cell[ok], mrna[ok], error[ok]),
        info=info,
        model=calibrated.model,
        types=calibrated.types,
    )
    result = _result(meta, [(library, whole)], settings, seconds=time.perf_counter() - t_start)
    report(progress, Stage.DONE, 1, 1)
    return result


@dataclass(frozen=True)
class _Kept:
    spot_mask: np.ndarray  # per tissue spot: got an estimate


def _n_layers(fit) -> int:
    return int(fit.model.n_layers) if fit.model is not None else int(fit.info.get("n_layers", 0))


def _spacing(meta, library_id, xy: np.ndarray) -> float:
    """The bins' side (Visium HD) or the median nearest-neighbour distance."""
    from .graph import spot_spacing
    from .pipeline import _square_bin_side

    side = _square_bin_side(meta, library_id)
    return float(side) if side else spot_spacing(xy)


def _run_tiles(source, tiles, reference, settings, fixed, client, progress, should_stop):
    """Every tile's answer: one after another here, or as tasks on ``client``."""
    answers = []
    report(progress, Stage.DECONVOLVING, 0, len(tiles))
    if client is None:
        for tile in tiles:
            check_stop(should_stop)
            answers.append(_fit_tile(source, None, tile, reference, settings, fixed))
            report(progress, Stage.DECONVOLVING, len(answers), len(tiles))
        return answers
    import distributed

    light = source.without_images()
    shared = client.scatter([light, dict(source.meta.uns), reference, fixed], broadcast=True)
    futures = [
        client.submit(
            _fit_tile,
            shared[0],
            shared[1],
            tile,
            shared[2],
            settings,
            shared[3],
            key=f"stlnmf-tile-{tile.index}-{uuid.uuid4().hex[:8]}",
            pure=False,
        )
        for tile in tiles
    ]
    try:
        for future in distributed.as_completed(futures):
            answers.append(future.result())
            future.release()
            report(progress, Stage.DECONVOLVING, len(answers), len(tiles))
            check_stop(should_stop)
    finally:
        client.cancel([f for f in futures if not f.done()])
    return answers
