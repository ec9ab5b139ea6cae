"""Many slides, one reference, on a ``dask.distributed`` cluster: :func:`deconvolve_many`.

The reference is prepared once in the calling process and broadcast to every worker; each
slide is one task (:func:`napari_stlnmf.deconvolve` on a worker), its results written into
``out/<slide>/`` as soon as it finishes (temporary names renamed into place, the writer of
``stlnmf run``) with a marker file written last, so that a re-run skips the slides already
done with the same options. A slide that fails is reported; the others complete. A worker that
dies takes its task with it and the scheduler runs it again elsewhere.

dask and distributed are imported inside the functions only (the ``[distributed]`` extra):
``import napari_stlnmf`` does not need them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from ._constants import MAX_CELLS_PER_TYPE
from ._main_guard import check_main_guard
from .errors import MissingDependencyError, OutputFolderError, ReferenceWarning, StlnmfError

__all__ = ["MARKER", "BatchResult", "deconvolve_many", "load_slide_result", "slide_names"]

# written into each slide's folder: "running" when its task starts, "done" (or "failed") last
MARKER = "stlnmf_batch.json"
_STAGING_PREFIX = ".stlnmf-partial-"  # output_folder's staging folders, left by a killed task
_INSTALL_HINT = "pip install 'napari-stlnmf[distributed]'"
# deconvolve() keywords a batch does not take: per-slide objects, or a file every task would write
_NOT_BATCH_OPTIONS = {"slide", "reference", "cell_type_key", "coords", "progress", "should_stop"}
_SUFFIXES = (".h5ad", ".zarr", ".h5", ".csv.gz", ".tsv.gz", ".txt.gz", ".csv", ".tsv", ".txt")


def _require_distributed():
    """The ``distributed`` module, or a message naming the extra to install."""
    try:
        import distributed
    except ImportError as exc:  # also a broken install (a missing dependency of dask)
        raise MissingDependencyError(
            f"deconvolve_many and `stlnmf batch` run on dask.distributed, which is not "
            f"installed ({exc}): {_INSTALL_HINT}"
        ) from None
    return distributed


@dataclass
class BatchResult:
    """What :func:`deconvolve_many` returns.

    ``summary``: one row per slide (``slide``, ``spots``, ``seconds``, ``status`` — ``'done'``,
    ``'skipped'`` (done by an earlier run with the same options) or ``'failed'`` — and
    ``message``: the error's type and text). ``batch[name]`` is a slide's
    :class:`~napari_stlnmf.api.DeconvolutionResult`: the one computed, or with ``out`` read back
    from ``out/<name>/`` when asked for (the results are not held in memory)."""

    summary: pd.DataFrame
    out: Path | None = None
    _results: dict = field(default_factory=dict, repr=False)

    @property
    def failed(self) -> dict[str, str]:
        """Slide name -> ``'ErrorType: message'`` of every slide that failed."""
        rows = self.summary[self.summary["status"] == "failed"]
        return dict(zip(rows["slide"], rows["message"]))

    @property
    def names(self) -> list[str]:
        """The slides that have results (done now or by an earlier run)."""
        return [str(n) for n in self.summary.loc[self.summary["status"] != "failed", "slide"]]

    def __getitem__(self, name: str):
        if name in self._results:
            return self._results[name]
        if name in self.failed:
            raise KeyError(f"slide {name!r} failed: {self.failed[name]}")
        if self.out is None or name not in self.names:
            raise KeyError(f"no slide {name!r} in this batch (slides: {self.names})")
        return load_slide_result(self.out / name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def slide_names(slides) -> dict[str, object]:
    """``{name: slide}`` from a mapping (kept as given) or a list of paths (named by their file
    stems; a Space Ranger ``outs/`` folder by its parent). Names must be usable as folder names
    and unique."""
    if isinstance(slides, Mapping):
        named = {str(k): v for k, v in slides.items()}
    elif isinstance(slides, (str, Path)):
        raise StlnmfError(
            f"slides={str(slides)!r} is one path: give a list of slide paths or a mapping "
            "{name: AnnData or path} (the CLI reads a list file with --slides)"
        )
    else:
        named, seen = {}, {}
        for item in slides:
            if not isinstance(item, (str, Path)):
                raise StlnmfError(
                    f"a list of slides holds paths only, got a {type(item).__name__}: give a "
                    "mapping {name: AnnData or path} to name in-memory slides"
                )
            name = _name_from_path(Path(item))
            if name in seen:
                raise StlnmfError(
                    f"two slides get the name {name!r} from their file names ({seen[name]} and "
                    f"{item}): their results would share a folder. Give a mapping "
                    "{name: path} with distinct names (or rename the files)"
                )
            seen[name] = item
            named[name] = item
    if not named:
        raise StlnmfError("no slides given: give at least one slide (a path or an AnnData)")
    for name in named:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise StlnmfError(
                f"slide name {name!r} cannot name a results folder: use a name without '/', "
                "'\\' or a leading '.'"
            )
    return named


def _name_from_path(path: Path) -> str:
    path = Path(str(path).rstrip("/"))
    if path.name == "outs" and path.parent.name:  # Space Ranger: <sample>/outs
        path = path.parent
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def deconvolve_many(
    slides,
    reference,
    *,
    cell_type_key: str | None = None,
    client=None,
    workers: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    retries: int = 1,
    maps: bool = True,
    progress: bool = True,
    slide_progress=None,
    **options,
) -> BatchResult:
    """Deconvolve many slides with one reference on a ``dask.distributed`` cluster.

    Parameters
    ----------
    slides
        Mapping ``{name: AnnData or path}``, or a list of paths (named by their file stems;
        duplicates are refused). Paths are read on the workers: on a cluster they must be
        visible there (a shared file system); in-memory AnnData travel with their task.
    reference
        As for :func:`~napari_stlnmf.deconvolve`. A single-cell reference is read and prepared
        once here (its seeded sample of cells, profiles) and broadcast to every worker.
    client
        A ``distributed.Client`` (an existing cluster: ``Client('tcp://host:8786')``, a
        dask-jobqueue ``SLURMCluster``, Kubernetes). ``None``: a ``LocalCluster`` of
        ``workers`` processes (default: one per core, at most one per slide) with one thread
        each, closed at the end.
    out
        Folder for the results: ``out/<name>/`` gets what ``stlnmf run`` writes
        (``proportions.csv``, ``mrna_fractions.csv``, ``spot_qc.csv``, ``result.h5ad``, maps
        unless ``maps=False``) as each slide finishes, then ``stlnmf_batch.json`` (options,
        seed, status). A re-run skips the slides done with the same options, reference and
        slide; a slide folder holding another run's results raises
        :class:`~napari_stlnmf.errors.OutputFolderError` unless ``overwrite``. ``None``: the
        results are returned in memory.
    retries
        Times a task that raised an unexpected error is run again (a worker that dies does not
        count: the scheduler reruns its tasks). Bad input (a
        :class:`~napari_stlnmf.errors.StlnmfError`) fails the slide at once.
    progress
        A progress bar of the slides (stderr).
    slide_progress
        ``progress(stage, i, n)`` callback of each slide's run, called on the worker.
    **options
        :func:`~napari_stlnmf.deconvolve`'s options (``seed``, ``method``, ``n_layers`` ...),
        the same for every slide; ``save_params`` is refused (every task would write it).

    Returns
    -------
    BatchResult
        ``summary`` (slide, spots, seconds, status, message), ``failed``, ``batch[name]``.
    """
    _check_options(options)
    if client is not None and workers is not None:
        raise StlnmfError(
            "give either client= (an existing cluster, its own workers) or workers= (a local "
            "cluster of that many processes), not both"
        )
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise StlnmfError(f"workers={workers!r}: give a whole number of at least 1")
    named = slide_names(slides)
    distributed = _require_distributed()

    out = None if out is None else Path(out)
    seed = int(options.get("seed", 0))
    cluster = _BatchCluster(distributed, client, workers)
    try:
        return _run_batch(
            distributed, cluster, named, reference, cell_type_key, out, overwrite, retries,
            maps, progress, slide_progress, seed, options,
        )  # fmt: skip
    finally:
        cluster.close()


class _BatchCluster:
    """The batch's client: the caller's, or a LocalCluster of this call's own, started when
    first needed (a re-run with every slide done starts none) and closed at the end."""

    def __init__(self, distributed, client, workers: int | None):
        self._distributed, self.client, self._workers = distributed, client, workers
        self._own = None

    def connect(self, n_slides: int):
        if self.client is None:
            check_main_guard()
            n_workers = self._workers or min(n_slides, os.cpu_count() or 1)
            self._own = _local_cluster(self._distributed, n_workers)
            self.client = self._distributed.Client(self._own)
        return self.client

    def close(self) -> None:
        if self._own is not None:
            self.client.close()
            self._own.close()


def _run_batch(
    distributed, cluster, named, reference, cell_type_key, out, overwrite, retries, maps,
    progress, slide_progress, seed, options,
) -> BatchResult:  # fmt: skip
    """deconvolve_many on its :class:`_BatchCluster`."""
    from tqdm.auto import tqdm

    warming = []
    pending = _not_done(out, named)
    if pending:
        # the workers start and import the engine (torch: seconds) while the reference is
        # prepared here
        warming = _warm_workers(cluster.connect(len(pending)))
    shared = _prepared_reference(reference, cell_type_key, options)
    ref_print = _fingerprint_reference(shared)
    options_record = json.loads(json.dumps(_plain(options), sort_keys=True))
    records = {
        name: {
            "slide": name,
            "seed": seed,
            "options": options_record,
            "cell_type_key": cell_type_key,
            "fingerprint": _digest([ref_print, options_record, cell_type_key, _slide_print(s)]),
            "version": __version__,
        }
        for name, s in named.items()
    }
    rows, todo = {}, []
    if out is not None:
        rows, todo = _plan(out, named, records, overwrite=overwrite)
    else:
        todo = list(named)
    results: dict = {}
    bar = tqdm(
        total=len(named), initial=len(rows), desc="Slides", unit="slide", file=sys.stderr,
        disable=not progress,
    )  # fmt: skip
    try:
        if todo:  # the markers may say done where the fingerprints do not
            client = cluster.connect(len(todo))
            ref_future = client.scatter(shared, broadcast=True)
            futures = {}
            for name in todo:
                folder = None if out is None else str(out / name)
                future = client.submit(
                    _run_slide, name, named[name], ref_future, cell_type_key, options, folder,
                    records[name], maps, slide_progress,
                    key=f"stlnmf-{name}-{uuid.uuid4().hex[:8]}", retries=retries, pure=False,
                )  # fmt: skip
                futures[future] = name
            for future in distributed.as_completed(futures):
                name = futures[future]
                row, result = _outcome(future, name)
                if row["status"] == "failed" and out is not None:
                    _write_marker(out / name, {**records[name], **row})
                if result is not None:
                    results[name] = result
                rows[name] = row
                future.release()
                bar.update(1)
                if row["status"] == "failed":
                    bar.write(f"slide {name} failed: {row['message']}", file=sys.stderr)
    finally:
        bar.close()
        if warming:
            cluster.client.cancel(warming)
    if out is not None:
        for name in named:
            _remove_staging(out / name)
    _warn_once({name: rows[name] for name in named if name in rows})  # in the slides' order
    summary = pd.DataFrame(
        [rows[name] for name in named], columns=["slide", "spots", "seconds", "status", "message"]
    )
    return BatchResult(summary=summary, out=out, _results=results)


def _local_cluster(distributed, n_workers: int):
    """A LocalCluster of ``n_workers`` processes, one thread each, without dask's default
    ``MALLOC_TRIM_THRESHOLD_=65536`` for its workers: with it, deconvolve ran 15-28 % slower
    (glibc returns freed memory to the system at every large temporary array); a variable the
    user set in the environment still wins. The workers' statistical profiler (a stack sample
    every 10 ms, for the dashboard, which this cluster does not serve) is off: 3-4 % per fit.
    The event loops' tick (a wake-up every 20 ms in the scheduler, each nanny and each worker,
    only to time the loop) runs once a second: each wake-up takes the GIL from the fit running
    in the worker's thread, ~5 % of a 24-slide batch (docs/benchmarks.md)."""
    import dask

    trim = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    quiet = {
        trim: None,
        "distributed.worker.profile.enabled": False,
        "distributed.admin.tick.interval": "1s",
    }
    with dask.config.set(quiet):
        return distributed.LocalCluster(
            n_workers=max(1, int(n_workers)), threads_per_worker=1, processes=True,
            dashboard_address=":0",
        )  # fmt: skip


def _not_done(out: Path | None, named: dict) -> list[str]:
    """The slides whose marker does not say done (a cheap look, before the reference is
    prepared and the plan compares fingerprints)."""
    if out is None:
        return list(named)
    return [n for n in named if (_read_marker(out / n) or {}).get("status") != "done"]


def _import_engine() -> None:
    import napari_stlnmf.api  # noqa: F401 -- torch and the engine, once per worker process


def _warm_workers(client) -> list:
    """One import task pinned to each worker now connected (none wait on it)."""
    return [
        client.submit(_import_engine, workers=[address], allow_other_workers=False, pure=False)
        for address in client.scheduler_info()["workers"]
    ]


def _warn_once(rows: dict) -> None:
    """Each reference warning of the slides' runs, once, naming the slides it was raised for
    (most are about the reference alone, the same for every slide)."""
    slides_of: dict[str, list[str]] = {}
    for name, row in rows.items():
        for message in row.pop("warnings", None) or []:
            slides_of.setdefault(message, []).append(name)
    for message, names in slides_of.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"{message} (slides: {shown})", ReferenceWarning, stacklevel=3)


def _check_options(options: dict) -> None:
    from .api import deconvolve

    known = set(inspect.signature(deconvolve).parameters) - _NOT_BATCH_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        raise StlnmfError(
            f"deconvolve_many got options it does not know: {unknown}. It takes deconvolve()'s "
            f"options, the same for every slide: {sorted(known - {'save_params'})}"
        )
    if options.get("save_params") is not None:
        raise StlnmfError(
            "save_params is not taken by deconvolve_many: every slide's task would write the "
            "same file. Train on one slide with deconvolve(..., train=True, save_params=...) and "
            "pass params= to the batch"
        )
    from .pipeline import DeconvolutionSettings

    settings = {k: v for k, v in options.items() if k in DeconvolutionSettings.__dataclass_fields__}
    DeconvolutionSettings(**settings)  # every value checked before a worker starts


def _prepared_reference(reference, cell_type_key, options):
    """A single-cell reference (AnnData or .h5ad) read and built once, as deconvolve builds it
    (same seeded sample of cells); a signature table (small; deconvolve checks its orientation
    against each slide) is passed on as a DataFrame."""
    import anndata as ad

    from . import io
    from .checks import check_cell_types_not_ids
    from .io._util import table_suffix
    from .pipeline import load_reference
    from .preprocess import Reference

    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if table_suffix(path):
            return io.read_reference(path)
        io.reference.require_reference_file(path)
    if isinstance(reference, (Reference, pd.DataFrame)):
        return reference
    if isinstance(reference, ad.AnnData) and cell_type_key in reference.obs:
        check_cell_types_not_ids(reference.obs[cell_type_key], cell_type_key)
    elif isinstance(reference, (str, Path)) and str(reference).lower().endswith(".h5ad"):
        obs = io.reference._read_obs(Path(reference))
        if cell_type_key in obs:
            check_cell_types_not_ids(obs[cell_type_key], cell_type_key)
    return load_reference(
        reference,
        cell_type_key,
        is_means=bool(options.get("reference_is_means", False)),
        max_cells_per_type=options.get("max_cells_per_type", MAX_CELLS_PER_TYPE),
        seed=int(options.get("seed", 0)),
    )


def _plan(out: Path, named: dict, records: dict, *, overwrite: bool):
    """Rows of the slides already done with the same inputs (skipped), and the slides to run.
    A slide folder holding results of other inputs is refused unless ``overwrite`` (before any
    computation)."""
    from .output_folder import check_output_folder, previous_results

    check_output_folder(out, overwrite=True)  # a folder we can write in
    skipped, todo, taken = {}, [], []
    for name in named:
        folder = out / name
        check_output_folder(folder, overwrite=True)
        marker = _read_marker(folder)
        ours = marker is not None and marker.get("fingerprint") == records[name]["fingerprint"]
        if ours and marker.get("status") == "done" and _files_present(folder, marker):
            skipped[name] = {
                "slide": name,
                "spots": marker.get("spots"),
                "seconds": marker.get("seconds"),
                "status": "skipped",
                "message": "done by an earlier run with the same options",
            }
            continue
        if not ours and previous_results(folder) and not overwrite:
            taken.append(name)
        todo.append(name)
    if taken:
        listed = ", ".join(taken[:5]) + (", ..." if len(taken) > 5 else "")
        raise OutputFolderError(
            f"{len(taken)} slide folder(s) in {str(out)!r} hold results of another run (other "
            f"options, reference or slide): {listed}. Give a new out folder, or overwrite=True "
            "(CLI: --overwrite) to replace them"
        )
    return skipped, todo


def _files_present(folder: Path, marker: dict) -> bool:
    return all((folder / name).is_file() for name in marker.get("files", []))


def _outcome(future, name: str):
    """The summary row (and the in-memory result, without ``out``) of a finished task."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 -- the task's error or the cluster's (KilledWorker)
        row = {"slide": name, "spots": None, "seconds": None, "status": "failed"}
        row["message"] = f"{type(exc).__name__}: {exc}"
        return row, None


def _run_slide(name, slide, reference, cell_type_key, options, folder, record, maps, progress):
    """One slide's task, on a worker: deconvolve, then write its folder (marker last)."""
    from .api import deconvolve

    t0 = time.perf_counter()
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_marker(folder, {**record, "status": "running"})
    try:
        # the reference check's warnings, raised on the worker, go back with the row
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReferenceWarning)
            result = deconvolve(
                slide, reference, cell_type_key=cell_type_key, progress=progress, **options
            )
    except StlnmfError as exc:  # bad input: the same on every retry
        row = {"slide": name, "spots": None, "seconds": time.perf_counter() - t0}
        row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
        return row, None
    result.model = None  # the shipped parameters; not sent back
    row = {"slide": name, "spots": int(result.proportions.shape[0])}
    row.update(seconds=round(time.perf_counter() - t0, 3), status="done", message="")
    row["warnings"] = [str(w.message) for w in caught if issubclass(w.category, ReferenceWarning)]
    if folder is None:
        return row, result
    written = _write_slide_folder(result, folder, options, maps)
    files = sorted(str(p.relative_to(folder)) for p in written)
    _write_marker(folder, {**record, **row, "files": files})
    return row, None


def _write_slide_folder(result, folder: Path, options: dict, maps: bool) -> list[Path]:
    from .cli import write_results
    from .output_folder import check_output_folder

    _remove_staging(folder)  # what a task killed while writing here left
    previous = check_output_folder(folder, overwrite=True)
    extras = {}
    if options.get("fractions", "cell") != "cell":  # proportions.csv holds the mRNA fractions
        extras["cell_fractions.csv"] = lambda p: result.cell_fractions.to_csv(
            p, index_label="barcode"
        )
    return write_results(
        result,
        folder,
        library_id=options.get("library_id"),
        library_key=options.get("library_key"),
        plots=maps,
        previous=previous,
        extras=extras,
    )


def load_slide_result(folder: str | Path):
    """A slide's :class:`~napari_stlnmf.api.DeconvolutionResult` read back from its batch folder
    (the tables; ``adata`` from ``result.h5ad``, ``info`` from its ``uns['stlnmf']``)."""
    import anndata as ad

    from ._constants import FIT_ERROR_KEY, QC_KEY, UNS_KEY
    from .api import DeconvolutionResult

    folder = Path(folder)
    marker = _read_marker(folder)
    if marker is None or marker.get("status") != "done":
        raise StlnmfError(
            f"{str(folder)!r} holds no finished batch result (no {MARKER} with status 'done'): "
            "run deconvolve_many (or `stlnmf batch`) again with the same out folder"
        )

    def table(name):
        # round_trip: the floats read back are the ones written, bit for bit
        return pd.read_csv(
            folder / name, index_col="barcode", dtype={"barcode": str}, float_precision="round_trip"
        )

    proportions = table("proportions.csv")
    mrna = table("mrna_fractions.csv")
    qc = table("spot_qc.csv")
    fractions = marker.get("options", {}).get("fractions", "cell")
    cell = proportions if fractions == "cell" else table("cell_fractions.csv")
    adata = ad.read_h5ad(folder / "result.h5ad") if (folder / "result.h5ad").is_file() else None
    info = dict(adata.uns.get(UNS_KEY, {})) if adata is not None else {}
    return DeconvolutionResult(
        proportions=proportions,
        cell_fractions=cell,
        mrna_fractions=mrna,
        fit_error=qc["fit_error"].rename(FIT_ERROR_KEY),
        qc=qc["qc"].astype(str).rename(QC_KEY),
        info=info,
        adata=adata,
    )


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(folder: Path, record: dict) -> None:
    """The marker, written under a temporary name and renamed (never half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MARKER}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(_plain(record), indent=1, sort_keys=True))
    os.replace(tmp, folder / MARKER)


def _remove_staging(folder: Path) -> None:
    if folder.is_dir():
        for stale in folder.glob(_STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in folder.glob(f".{MARKER}.*.tmp"):
            stale.unlink(missing_ok=True)


def _plain(value):
    """JSON-ready: paths as strings, numpy scalars as numbers, callables by name."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(_plain(parts), sort_keys=True).encode()).hexdigest()[:32]


def _hash_arrays(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()[:32]


def _fingerprint_reference(reference) -> str:
    from .preprocess import Reference

    if isinstance(reference, Reference):
        parts = [reference.profiles.to_numpy(), reference.profiles.index.astype(str).to_numpy()]
        parts.append(np.asarray(reference.cell_types, dtype=object))
        if reference.cell_counts is not None:
            parts += [reference.cell_counts.data, reference.cell_counts.indices]
        return _hash_arrays(*parts)
    return _hash_arrays(
        reference.to_numpy(),
        reference.index.astype(str).to_numpy(),
        reference.columns.astype(str).to_numpy(),
    )


def _slide_print(slide) -> str:
    """What identifies a slide's input: a path with its size and modification time; an
    AnnData's counts, spot names and positions."""
    import scipy.sparse as sp

    if isinstance(slide, (str, Path)):
        path = Path(slide).resolve()
        stat = path.stat() if path.exists() else None
        return f"{path}:{stat.st_size if stat else None}:{stat.st_mtime_ns if stat else None}"
    X = slide.X
    parts = [np.asarray(slide.obs_names.astype(str), dtype=object)]
    if sp.issparse(X):
        X = X.tocsr()
        parts += [X.data, X.indices, X.indptr]
    elif X is not None:
        parts.append(np.asarray(X))
    if "spatial" in slide.obsm:
        parts.append(np.asarray(slide.obsm["spatial"]))
    return _hash_arrays(*parts)
