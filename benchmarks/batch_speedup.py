"""Many slides: ``deconvolve_many`` on a LocalCluster vs the same slides one by one.

24 simulated Visium-size slides (78 x 64 hexagonal spots = 4,992 each, a whole Visium capture
area; 18,000 genes, as a Space Ranger matrix holds after dropping unexpressed genes; 12 cell
types, a platform effect), written as ``.h5ad`` files, with one single-cell reference file
(``.h5ad``, 300 cells per type). Both runs start from the files and write every slide's results
(tables + ``result.h5ad``, no PNG maps):

* one by one: ``deconvolve(path, reference_path, ...)`` + ``write_results`` in this process, one
  thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), the reference read for each slide
  as ``stlnmf run`` would;
* batch: ``deconvolve_many(paths, reference_path, workers=W, out=...)``: a LocalCluster of W
  processes with one thread each, started and closed inside the timed call.

Both give the same proportions (checked here, bit for bit). Writes ``docs/bench_batch.md``
(included in docs/benchmarks.md by run_benchmarks.py) and prints it.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python batch_speedup.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
KEY = "cell_type"


def make_inputs(
    folder: Path, n_slides: int, rows: int, cols: int, n_genes: int = 2000, seed: int = 0
):
    from napari_stlnmf.datasets import hex_layout, make_reference
    from napari_stlnmf.preprocess import build_reference
    from napari_stlnmf.simulate import simulate_slide

    reference = make_reference(n_types=12, n_genes=n_genes, cells_per_type=300, seed=seed)
    ref_path = folder / "reference.h5ad"
    reference.write_h5ad(ref_path)
    built = build_reference(reference, cell_type_key=KEY)
    xy = hex_layout(rows, cols)
    paths = []
    for i in range(n_slides):
        sim = simulate_slide(
            xy, built, kind=("regions", "smooth")[i % 2], platform_sigma=0.3, seed=seed + 100 + i
        )
        slide = ad.AnnData(
            X=sp.csr_matrix(sim.counts.astype(np.float32)),
            obs=pd.DataFrame(index=[f"s{i}_spot{j}" for j in range(len(xy))]),
            var=pd.DataFrame(index=list(built.genes)),
        )
        slide.obsm["spatial"] = xy
        path = folder / f"slide{i:02d}.h5ad"
        slide.write_h5ad(path)
        paths.append(path)
    return paths, ref_path


def one_by_one(
    paths, ref_path, out: Path, seed: int, *, reuse_reference: bool = False
) -> tuple[float, dict]:
    """``deconvolve`` + ``write_results`` per slide in this process, one thread, the reference
    file read for each slide as ``stlnmf run`` does. ``reuse_reference``: the reference read
    and built once (on the clock, as the batch builds it once) and the same object passed to
    every slide: what a script looping over slides does, and what each batch worker does with
    the scattered reference (its sub-profile splits kept, ``Reference.memo``); the batch
    against this row is the parallel gain alone. The imports are off the clock in every row."""
    import torch

    from napari_stlnmf import deconvolve
    from napari_stlnmf._constants import MAX_CELLS_PER_TYPE
    from napari_stlnmf.cli import write_results
    from napari_stlnmf.pipeline import load_reference

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    reference = ref_path
    if reuse_reference:
        reference = load_reference(ref_path, KEY, max_cells_per_type=MAX_CELLS_PER_TYPE, seed=seed)
    props = {}
    for path in paths:
        res = deconvolve(path, reference, cell_type_key=KEY, seed=seed)
        write_results(res, out / path.stem, plots=False)
        props[path.stem] = res.proportions
    return time.perf_counter() - t0, props


def batch(
    paths, ref_path, out: Path, workers: int, seed: int, *, running: bool = False
) -> tuple[float, dict, pd.DataFrame]:
    """``deconvolve_many`` with its own LocalCluster, or (``running``) on a cluster started and
    warmed before the clock (its workers have imported the engine), as an atlas project's
    cluster is when its next batch comes: the batch's cost without the cluster's start."""
    import distributed

    from napari_stlnmf import deconvolve_many
    from napari_stlnmf.distributed import _import_engine, _local_cluster

    cluster = client = None
    if running:
        cluster = _local_cluster(distributed, workers)
        client = distributed.Client(cluster)
        client.run(_import_engine)
    t0 = time.perf_counter()
    try:
        res = deconvolve_many(
            paths, ref_path, cell_type_key=KEY, client=client,
            workers=None if running else workers, out=out, maps=False, progress=False,
            seed=seed,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    finally:
        if running:
            client.close()
            cluster.close()
    props = {name: res[name].proportions for name in res.names}
    return seconds, props, res.summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=24)
    p.add_argument("--rows", type=int, default=78)
    p.add_argument("--cols", type=int, default=64)
    p.add_argument("--genes", type=int, default=18000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DOCS / "bench_batch.md")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        load_before = os.getloadavg()[0]
        paths, ref_path = make_inputs(tmp, a.slides, a.rows, a.cols, a.genes, seed=a.seed)
        print(f"simulated {len(paths)} slides in {time.perf_counter() - t0:.0f} s", flush=True)
        t_serial, serial = one_by_one(paths, ref_path, tmp / "serial", a.seed)
        print(f"one by one: {t_serial:.1f} s", flush=True)
        t_reused, reused = one_by_one(paths, ref_path, tmp / "reused", a.seed, reuse_reference=True)
        print(f"one by one, reference reused: {t_reused:.1f} s", flush=True)
        t_batch, batched, summary = batch(paths, ref_path, tmp / "batch", a.workers, a.seed)
        print(f"batch ({a.workers} workers): {t_batch:.1f} s", flush=True)
        t_running, running, _ = batch(
            paths, ref_path, tmp / "running", a.workers, a.seed, running=True
        )
        print(f"batch on a running cluster: {t_running:.1f} s", flush=True)
    same = all(
        np.array_equal(serial[k].to_numpy(), other[k].to_numpy(), equal_nan=True)
        for k in serial
        for other in (batched, reused, running)
    )
    n_spots = a.rows * a.cols
    ratio = t_serial / t_batch
    ratio_reused = t_reused / t_batch
    ratio_running = t_reused / t_running
    task = summary["seconds"].astype(float)
    cmd = "cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python batch_speedup.py"
    extra = " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    setup = (
        f"Generated by `{cmd}{' ' + extra if extra else ''}` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.machine()}, {os.cpu_count()} cores, load average {load_before:.2f} before the "
        "run started (other jobs on the box lower the ratio). "
        f"{a.slides} simulated Visium-size slides ({n_spots:,} spots, {a.genes:,} genes, 12 types, "
        "platform effect) and a single-cell reference (3,600 cells), all `.h5ad` files; each "
        "slide's tables and `result.h5ad` written (no maps). *One by one*: `deconvolve` + "
        "`write_results` per slide in one process, one thread, the reference file read for "
        "each slide as `stlnmf run` does. *One by one, reference reused*: the same with the "
        "reference read and built once and the same object passed to every slide, as a script's "
        "loop does (it keeps its sub-profile splits). *Batch*: "
        f"`deconvolve_many(paths, reference, workers={a.workers}, out=...)`, a LocalCluster of "
        f"{a.workers} processes × 1 thread started and closed inside the timed call, the "
        "reference prepared once and scattered to the workers. *Running cluster*: the same "
        "call with `client=` a LocalCluster of the same settings started before the clock, its "
        "workers having imported the engine (an atlas project's cluster when its next batch "
        "comes). Every row starts its clock after this process's imports (torch, dask) and "
        "includes reading the reference."
    )
    running_row = (
        f"| deconvolve_many, client= a running cluster ({a.workers} × 1 thread) "
        f"| {t_running:.1f} | {t_running / a.slides:.2f} |"
    )
    batch_row = (
        f"| deconvolve_many, LocalCluster({a.workers} × 1 thread) | {t_batch:.1f} "
        f"| {t_batch / a.slides:.2f} |"
    )
    speedup = (
        f"- speed-up: **{ratio:.2f}×** with {a.workers} workers (task time on the workers: "
        f"median {task.median():.2f} s, mean {task.mean():.2f} s, max {task.max():.2f} s; "
        f"one by one: {t_serial / a.slides:.2f} s per slide); against the one-by-one loop "
        f"that reuses the reference, the parallel gain alone: **{ratio_reused:.2f}×**; on the "
        f"running cluster against that loop: **{ratio_running:.2f}×**"
    )
    cluster = (
        "The same command on a real cluster: start a scheduler and workers (e.g. dask-jobqueue's "
        "`SLURMCluster(cores=1, processes=1, memory='8GB').scale(jobs=32)`, or `dask scheduler` "
        "and `dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1` on each node), then "
        "`stlnmf batch --slides slides.txt --reference ref.h5ad --cell-type-key cell_type "
        "--out results --scheduler tcp://HOST:8786` (slide and reference paths on a file "
        "system the workers share). A cluster of your own keeps dask's defaults; "
        "`DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s` and "
        "`DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False` in the workers' environment give "
        "them the settings of `deconvolve_many`'s own cluster (~5 % and 3–4 % of a fit)."
    )
    lines = [
        "## Many slides on a dask cluster",
        "",
        setup,
        "",
        "| run | wall time (s) | per slide (s) |",
        "|---|---|---|",
        f"| one by one, 1 process | {t_serial:.1f} | {t_serial / a.slides:.2f} |",
        f"| one by one, reference reused | {t_reused:.1f} | {t_reused / a.slides:.2f} |",
        batch_row,
        running_row,
        "",
        speedup,
        f"- proportions identical to the one-by-one runs for every slide: {same}",
        "",
        cluster,
    ]
    text = "\n".join(lines) + "\n"
    a.out.write_text(text)
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
