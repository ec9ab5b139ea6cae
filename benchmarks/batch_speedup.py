"""Many slides: ``deconvolve_many`` on a LocalCluster vs the same slides one by one.

24 simulated Visium-size slides (78 x 64 hexagonal spots = 4,992 each, a whole Visium capture
area; 18,000 genes, as a Space Ranger matrix holds after dropping unexpressed genes; 12 cell
types, a platform effect), written as ``.h5ad`` files, with one single-cell reference file
(``.h5ad``, 300 cells per type). Every row starts from the files and writes every slide's
results (tables + ``result.h5ad``, no PNG maps), in fresh processes of its own:

* one by one: ``deconvolve(path, reference_path, ...)`` + ``write_results`` per slide in one
  process, one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), the reference read
  for each slide as ``stlnmf run`` would; then the same loop with the reference read and built
  once (the parallel gain's baseline);
* two plain processes, each that loop on half the slides, started together: the box's ceiling;
* batch: ``deconvolve_many(paths, reference_path, workers=W, out=...)``: a LocalCluster of W
  processes with one thread each, started and closed inside the timed call; then the same call
  on a cluster started before the clock.

The rows run in ``--repeats`` interleaved rounds and each ratio is taken within a round (this
VM's speed drifts within minutes). Every row gives the same proportions (checked, bit for bit).
Writes ``docs/bench_batch.md`` (included in docs/benchmarks.md by run_benchmarks.py) and prints
it. A quick check of the script: ``--slides 4 --rows 12 --cols 10 --genes 600 --repeats 1``.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python batch_speedup.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
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
) -> tuple[float, float, dict]:
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
    return t0, time.perf_counter(), props


def batch(
    paths, ref_path, out: Path, workers: int, seed: int, *, running: bool = False
) -> tuple[float, float, object]:
    """``deconvolve_many`` with its own LocalCluster, or (``running``) on a cluster started and
    warmed before the clock (its workers have imported the engine), as an atlas project's
    cluster is when its next batch comes: the batch's cost without the cluster's start. Returns
    the clock stamps and the ``BatchResult`` (its slides' results are read back on demand)."""
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
        t1 = time.perf_counter()
    finally:
        if running:
            client.close()
            cluster.close()
    return t0, t1, res


# each row's label in the table; "split" is two plain processes (no dask) of half the slides each
ROWS = {
    "serial": "one by one, 1 process",
    "reused": "one by one, reference reused",
    "split": "two plain processes, half the slides each, reference reused (no dask)",
    "batch": "deconvolve_many, LocalCluster({w} × 1 thread)",
    "running": "deconvolve_many, client= a running cluster ({w} × 1 thread)",
}


def run_row(a) -> int:
    """One row (or, with ``--parts``, one part of the split row) in this fresh process; writes
    its clock stamps (``perf_counter``: the system's monotonic clock, comparable between
    processes) and, if asked, the proportions to ``--result``."""
    import distributed  # noqa: F401 -- every import before the clock
    import torch  # noqa: F401

    import napari_stlnmf.cli
    import napari_stlnmf.distributed  # noqa: F401

    paths = sorted(a.inputs.glob("slide*.h5ad"))[a.part :: a.parts]
    ref_path = a.inputs / "reference.h5ad"
    if a.parts > 1:  # the split row's processes start their clocks together
        print("ready", flush=True)
        sys.stdin.readline()
    out = a.work / f"{a.row}-{a.part}"
    extra = {}
    if a.row in ("serial", "reused"):
        t0, t1, props = one_by_one(paths, ref_path, out, a.seed, reuse_reference=a.row != "serial")
    else:
        t0, t1, res = batch(paths, ref_path, out, a.workers, a.seed, running=a.row == "running")
        extra["task_seconds"] = res.summary["seconds"].astype(float).tolist()
        # read back (each slide's result.h5ad) only in the round that compares them
        props = {name: res[name].proportions for name in res.names} if a.save_proportions else {}
    a.result.write_text(json.dumps({"start": t0, "end": t1, **extra}))
    if a.save_proportions:
        np.savez(a.result.with_suffix(".npz"), **{k: v.to_numpy() for k, v in props.items()})
    return 0


def _timed_row(row: str, a, inputs: Path, work: Path, repeat: int) -> dict:
    """Run one row in fresh process(es) of this script; its wall time and task times."""
    parts = 2 if row == "split" else 1
    procs, results = [], []
    for part in range(parts):
        result = work / f"{row}-{repeat}-{part}.json"
        cmd = [
            sys.executable, __file__, "--row", "reused" if row == "split" else row,
            "--inputs", str(inputs), "--work", str(work / f"{row}-{repeat}"),
            "--result", str(result), "--part", str(part), "--parts", str(parts),
            "--workers", str(a.workers), "--seed", str(a.seed),
        ]  # fmt: skip
        if repeat == 0:
            cmd.append("--save-proportions")
        procs.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
        results.append(result)
    if parts > 1:
        for proc in procs:
            proc.stdout.readline()  # "ready": imported
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
    for proc in procs:
        proc.communicate()
        if proc.returncode:
            raise SystemExit(f"row {row} failed (exit code {proc.returncode})")
    stamps = [json.loads(r.read_text()) for r in results]
    shutil.rmtree(work / f"{row}-{repeat}", ignore_errors=True)
    return {
        "seconds": max(s["end"] for s in stamps) - min(s["start"] for s in stamps),
        "task_seconds": [t for s in stamps for t in s.get("task_seconds", [])],
        "proportions": [r.with_suffix(".npz") for r in results],
    }


def _same_proportions(runs: dict) -> bool:
    """Every row's first run gives the one-by-one run's proportions, bit for bit."""

    def load(files):
        out = {}
        for f in files:
            with np.load(f) as z:
                out.update({k: z[k] for k in z.files})
        return out

    serial = load(runs["serial"][0]["proportions"])
    for rows in runs.values():
        other = load(rows[0]["proportions"])
        if other.keys() != serial.keys() or not all(
            np.array_equal(serial[k], other[k], equal_nan=True) for k in serial
        ):
            return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=24)
    p.add_argument("--rows", type=int, default=78)
    p.add_argument("--cols", type=int, default=64)
    p.add_argument("--genes", type=int, default=18000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="rounds of every row, interleaved")
    p.add_argument("--out", type=Path, default=DOCS / "bench_batch.md")
    # a row's own process (used by the rounds)
    p.add_argument(
        "--row", choices=["serial", "reused", "batch", "running"], help=argparse.SUPPRESS
    )
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--save-proportions", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if a.row:
        return run_row(a)
    runs = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        load_before = os.getloadavg()[0]
        paths, _ = make_inputs(tmp, a.slides, a.rows, a.cols, a.genes, seed=a.seed)
        print(f"simulated {len(paths)} slides in {time.perf_counter() - t0:.0f} s", flush=True)
        order = list(ROWS)
        for repeat in range(a.repeats):
            for row in order[repeat % len(order) :] + order[: repeat % len(order)]:
                runs[row].append(_timed_row(row, a, tmp, tmp / "work", repeat))
                print(f"round {repeat + 1}: {row} {runs[row][-1]['seconds']:.1f} s", flush=True)
        same = _same_proportions(runs)
    text = _report(a, argv, runs, same, load_before)
    a.out.write_text(text)
    print(text)
    return 0 if same else 1


def _report(a, argv, runs: dict, same: bool, load_before: float) -> str:
    seconds = {row: np.array([r["seconds"] for r in rs]) for row, rs in runs.items()}
    median = {row: float(np.median(s)) for row, s in seconds.items()}

    def ratio(num: str, den: str) -> str:
        per_round = seconds[num] / seconds[den]  # the rows of one round ran minutes apart
        listed = " / ".join(f"{r:.2f}" for r in per_round)
        return f"**{np.median(per_round):.2f}×** (rounds: {listed})"

    task = np.array(runs["batch"][0]["task_seconds"])
    n_spots = a.rows * a.cols
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
        "loop does (it keeps its sub-profile splits). *Two plain processes*: that loop on half "
        "the slides in each of two processes started together, no dask: what the two cores give "
        "without any scheduler. *Batch*: "
        f"`deconvolve_many(paths, reference, workers={a.workers}, out=...)`, a LocalCluster of "
        f"{a.workers} processes × 1 thread started and closed inside the timed call, the "
        "reference prepared once and scattered to the workers. *Running cluster*: the same "
        "call with `client=` a LocalCluster of the same settings started before the clock, its "
        "workers having imported the engine (an atlas project's cluster when its next batch "
        "comes). Each row runs in fresh processes of its own, its clock started after their "
        "imports (torch, dask) and including reading the reference; the rows run in "
        f"{a.repeats} interleaved rounds (each round in a rotated order) because this VM's "
        "speed drifts within minutes, and each ratio is taken within a round."
    )
    rows = [
        f"| {label.format(w=a.workers)} | {median[row]:.1f} | {median[row] / a.slides:.2f} "
        f"| {' / '.join(f'{s:.1f}' for s in seconds[row])} |"
        for row, label in ROWS.items()
    ]
    speedup = [
        f"- against one by one as `stlnmf run` does it: {ratio('serial', 'batch')}",
        (
            "- the parallel gain alone (against the loop that reuses the reference): "
            f"{ratio('reused', 'batch')}; on the running cluster {ratio('reused', 'running')}"
        ),
        (
            "- two plain processes without dask against the same loop (the ceiling on this "
            f"box): {ratio('reused', 'split')}; the batch's share of that ceiling: "
            f"{ratio('split', 'batch').replace('×', '')}"
        ),
        (
            f"- task time on the workers (first round): median {np.median(task):.2f} s, "
            f"max {task.max():.2f} s"
        ),
        f"- proportions identical to the one-by-one run for every slide and row: {same}",
    ]
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
        "| run | wall time, median (s) | per slide (s) | every round (s) |",
        "|---|---|---|---|",
        *rows,
        "",
        *speedup,
        "",
        cluster,
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
