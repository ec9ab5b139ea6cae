"""Many slides on a dask.distributed LocalCluster (2 worker processes, 1 thread each):
the same proportions as single-slide runs, re-runs that skip finished slides, a bad slide that
fails alone, a worker killed mid-batch, the `stlnmf batch` command, and a core install
without dask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stlnmf import deconvolve
from napari_stlnmf.errors import (
    GeneMismatchError,
    OutputFolderError,
    ReferenceWarning,
    StlnmfError,
)

pytest.importorskip("distributed", reason="the [distributed] extra is not installed")

from napari_stlnmf.distributed import MARKER, deconvolve_many, slide_names

KEY = "cell_type"
SEED = 3
RESULT_FILES = {
    MARKER,
    "stlnmf_run.json",
    "proportions.csv",
    "mrna_fractions.csv",
    "spot_qc.csv",
    "result.h5ad",
}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def slides(demo_reference):
    """Four small simulated slides on hexagonal layouts of different sizes."""
    from napari_stlnmf.datasets import hex_layout
    from napari_stlnmf.simulate import simulate_slide

    out = {}
    for i, (rows, cols) in enumerate([(8, 8), (7, 9), (9, 6), (6, 6)]):
        xy = hex_layout(rows, cols)
        sim = simulate_slide(xy, demo_reference, kind="regions", seed=20 + i)
        names = [f"s{i}_spot{j}" for j in range(len(xy))]
        slide = ad.AnnData(
            X=sp.csr_matrix(sim.counts),
            obs=pd.DataFrame(index=names),
            var=pd.DataFrame(index=demo_reference.genes),
        )
        slide.obsm["spatial"] = xy
        out[f"slide{i}"] = slide
    return out


@pytest.fixture(scope="module")
def single_runs(slides, demo):
    """Each slide deconvolved alone in this process, one thread (as a worker runs)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return {
                name: deconvolve(slide, demo[1], cell_type_key=KEY, seed=SEED)
                for name, slide in slides.items()
            }
    finally:
        torch.set_num_threads(threads)


def _assert_same(batch_result, single):
    for table in ("proportions", "mrna_fractions", "cell_fractions"):
        got, want = getattr(batch_result, table), getattr(single, table)
        assert list(got.index) == list(want.index) and list(got.columns) == list(want.columns)
        assert np.array_equal(got.to_numpy(), want.to_numpy(), equal_nan=True), table
    np.testing.assert_array_equal(batch_result.qc.to_numpy(), single.qc.to_numpy())


def test_batch_gives_each_slide_its_single_run_result(client, slides, demo, single_runs, tmp_path):
    """Written to out/ and read back, and returned in memory: bit for bit the proportions of
    deconvolve() on each slide alone with the same seed."""
    batch = deconvolve_many(
        slides, demo[1], cell_type_key=KEY, client=client, out=tmp_path, maps=False,
        progress=False, seed=SEED,
    )  # fmt: skip
    assert list(batch.summary["slide"]) == list(slides)
    assert (batch.summary["status"] == "done").all(), batch.summary
    assert list(batch.summary["spots"]) == [s.n_obs for s in slides.values()]
    assert batch.failed == {}
    for name in slides:
        assert {p.name for p in (tmp_path / name).iterdir()} == RESULT_FILES
        marker = json.loads((tmp_path / name / MARKER).read_text())
        assert marker["status"] == "done" and marker["seed"] == SEED
        _assert_same(batch[name], single_runs[name])
        assert batch[name].adata.n_obs == slides[name].n_obs

    two = {k: slides[k] for k in ("slide1", "slide3")}
    in_memory = deconvolve_many(
        two, demo[1], cell_type_key=KEY, client=client, progress=False, seed=SEED
    )
    for name in two:
        _assert_same(in_memory[name], single_runs[name])
        assert in_memory[name].info["seed"] == SEED
    # nothing of the batch stays on the user's cluster: neither the slides' tasks nor the
    # import tasks that warmed the workers while the reference was prepared
    deadline = time.monotonic() + 10
    while (left := client.run_on_scheduler(_task_keys)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


def _task_keys(dask_scheduler):
    return [str(key) for key in dask_scheduler.tasks]


def test_rerun_skips_slides_done_with_the_same_options(client, slides, demo, tmp_path):
    first = {k: slides[k] for k in ("slide0", "slide3")}
    deconvolve_many(
        first, demo[1], cell_type_key=KEY, client=client, out=tmp_path, maps=False,
        progress=False, n_layers=20,
    )  # fmt: skip
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    # the same folder, one slide more: only that one runs
    more = {**first, "slide1": slides["slide1"]}
    batch = deconvolve_many(
        more, demo[1], cell_type_key=KEY, client=client, out=tmp_path, maps=False,
        progress=False, n_layers=20,
    )  # fmt: skip
    status = dict(zip(batch.summary["slide"], batch.summary["status"]))
    assert status == {"slide0": "skipped", "slide3": "skipped", "slide1": "done"}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    assert batch["slide0"].proportions.shape[0] == slides["slide0"].n_obs  # read from out/

    # other options in the same folder: refused before any computation, unless overwrite
    with pytest.raises(OutputFolderError, match="overwrite"):
        deconvolve_many(
            first, demo[1], cell_type_key=KEY, client=client, out=tmp_path, progress=False,
            n_layers=30,
        )  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = deconvolve_many(
        first, demo[1], cell_type_key=KEY, client=client, out=tmp_path, maps=False,
        progress=False, n_layers=30, overwrite=True,
    )  # fmt: skip
    assert (again.summary["status"] == "done").all()
    marker = json.loads((tmp_path / "slide0" / MARKER).read_text())
    assert marker["options"]["n_layers"] == 30


def test_own_cluster_starts_only_for_slides_to_run(client, slides, demo, tmp_path, monkeypatch):
    """Without client=, a re-run whose slides are all done starts no cluster; one whose markers
    say done but whose options differ starts it once the plan says so."""
    import napari_stlnmf.distributed as batch_module

    first = {k: slides[k] for k in ("slide0", "slide3")}
    deconvolve_many(
        first, demo[1], cell_type_key=KEY, client=client, out=tmp_path, maps=False,
        progress=False, n_layers=20,
    )  # fmt: skip
    started = []
    real = batch_module._local_cluster

    def counted(distributed, n_workers):
        started.append(n_workers)
        return real(distributed, n_workers)

    monkeypatch.setattr(batch_module, "_local_cluster", counted)
    again = deconvolve_many(
        first, demo[1], cell_type_key=KEY, out=tmp_path, maps=False, progress=False,
        n_layers=20,
    )  # fmt: skip
    assert (again.summary["status"] == "skipped").all() and started == []
    other = deconvolve_many(
        first, demo[1], cell_type_key=KEY, out=tmp_path, maps=False, progress=False,
        n_layers=30, overwrite=True, workers=1,
    )  # fmt: skip
    assert (other.summary["status"] == "done").all() and started == [1]


def test_a_bad_slide_fails_alone_and_is_reported(client, slides, demo, tmp_path):
    bad = slides["slide3"].copy()
    bad.var_names = [f"Other{i}" for i in range(bad.n_vars)]  # no gene of the reference
    batch = deconvolve_many(
        {"slide0": slides["slide0"], "bad": bad, "slide2": slides["slide2"]},
        demo[1], cell_type_key=KEY, client=client, out=tmp_path, maps=False, progress=False,
    )  # fmt: skip
    status = dict(zip(batch.summary["slide"], batch.summary["status"]))
    assert status == {"slide0": "done", "bad": "failed", "slide2": "done"}
    assert list(batch.failed) == ["bad"]
    assert batch.failed["bad"].startswith(GeneMismatchError.__name__)
    assert batch.names == ["slide0", "slide2"]
    with pytest.raises(KeyError, match="failed"):
        batch["bad"]
    marker = json.loads((tmp_path / "bad" / MARKER).read_text())
    assert marker["status"] == "failed" and "GeneMismatchError" in marker["message"]
    assert not (tmp_path / "bad" / "proportions.csv").exists()
    for name in ("slide0", "slide2"):
        assert (tmp_path / name / "proportions.csv").is_file()


def test_reference_warnings_come_back_once(client, slides, demo):
    """The reference check runs on the workers; its warnings reach the caller, each once,
    naming the slides (a type with 10 cells: the same finding for every slide)."""
    reference = demo[1]
    labels = reference.obs[KEY].astype(str)
    few = labels.unique()[0]
    keep = (labels != few).to_numpy()
    keep[np.flatnonzero(labels == few)[:10]] = True
    reference = reference[keep].copy()
    two = {k: slides[k] for k in ("slide1", "slide3")}
    with pytest.warns(ReferenceWarning) as record:
        batch = deconvolve_many(
            two, reference, cell_type_key=KEY, client=client, progress=False, n_layers=20
        )
    assert (batch.summary["status"] == "done").all()
    ours = [str(w.message) for w in record if issubclass(w.category, ReferenceWarning)]
    assert len(ours) == len(set(ours))
    few_cells = [m for m in ours if "fewer than" in m and few in m]
    assert len(few_cells) == 1 and few_cells[0].endswith("(slides: slide1, slide3)")
    assert "warnings" not in batch.summary.columns


def test_slide_names_from_paths_refuse_duplicates(tmp_path):
    names = slide_names([tmp_path / "a" / "s1.h5ad", tmp_path / "sample2" / "outs"])
    assert list(names) == ["s1", "sample2"]
    with pytest.raises(StlnmfError, match="s1"):
        slide_names([tmp_path / "a" / "s1.h5ad", tmp_path / "b" / "s1.h5ad"])
    with pytest.raises(StlnmfError, match="save_params"):
        deconvolve_many({"a": "a.h5ad"}, "ref.h5ad", save_params=tmp_path / "p.pt")
    with pytest.raises(StlnmfError, match="n_layer"):
        deconvolve_many({"a": "a.h5ad"}, "ref.h5ad", n_layer=3)
    with pytest.raises(StlnmfError, match="not both"):
        deconvolve_many({"a": "a.h5ad"}, "ref.h5ad", client=object(), workers=2)
    with pytest.raises(StlnmfError, match="at least 1"):
        deconvolve_many({"a": "a.h5ad"}, "ref.h5ad", workers=0)


def test_cli_batch_end_to_end(client, slides, demo, tmp_path, capsys):
    from napari_stlnmf.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for name in ("slide0", "slide2"):
        slides[name].write_h5ad(data / f"{name}.h5ad")
    bad = slides["slide1"].copy()
    bad.X = bad.X.astype(np.float32) / 7.3  # not counts
    bad.write_h5ad(data / "notcounts.h5ad")
    demo[1].write_h5ad(data / "reference.h5ad")
    listing = tmp_path / "slides.txt"
    listing.write_text(
        "# three slides\ndata/slide0.h5ad\n\ndata/notcounts.h5ad\ndata/slide2.h5ad\n"
    )
    out = tmp_path / "results"
    args = ["batch", "--slides", str(listing), "--reference", str(data / "reference.h5ad")]
    args += ["--cell-type-key", KEY, "--out", str(out), "--scheduler", client.scheduler.address]
    args += ["--quiet", "--no-maps", "--layers", "20"]
    assert main(args) == 1  # a slide failed
    printed = capsys.readouterr().out
    assert "NotRawCountsError" in printed and "2 of 3 slides" in printed
    for name in ("slide0", "slide2"):
        table = pd.read_csv(out / name / "proportions.csv", index_col=0)
        assert list(table.index) == list(slides[name].obs_names)
        np.testing.assert_allclose(table.sum(1), 1.0, atol=1e-6)

    # fixed: the same command runs only that slide
    slides["slide1"].write_h5ad(data / "notcounts.h5ad")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2 and "3 of 3 slides" in printed

    # a listed path that does not exist: exit 2 before anything runs
    listing.write_text("data/slide0.h5ad\ndata/missing.h5ad\n")
    assert main(args) == 2
    assert "missing.h5ad" in capsys.readouterr().err


def test_worker_killed_mid_batch(client, slides, demo, single_runs, tmp_path):
    """The first slide to reach the fit kills its worker process (SIGKILL, once: a flag file);
    the scheduler reruns its task on a live worker. Every slide has its results once, the same
    as alone, and no temporary file is left — neither from this kill nor from an earlier
    task killed while writing (its staging folder, planted here)."""
    flag = tmp_path / "killed"
    before = set(client.scheduler_info()["workers"])

    def kill_once(stage, i, n):
        if stage == "deconvolving":
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    out = tmp_path / "out"
    stale = out / "slide2" / ".stlnmf-partial-killed"
    stale.mkdir(parents=True)
    (stale / "proportions.csv").write_text("barcode,type_0\nspot0,0.")
    batch = deconvolve_many(
        slides, demo[1], cell_type_key=KEY, client=client, out=out, maps=False, progress=False,
        seed=SEED, slide_progress=kill_once, retries=0,
    )  # fmt: skip
    assert flag.exists()  # a worker was killed
    after = set(client.scheduler_info()["workers"])
    assert before - after, "the killed worker should have been replaced"
    assert list(batch.summary["slide"]) == list(slides)
    assert (batch.summary["status"] == "done").all(), batch.summary
    for name, slide in slides.items():
        assert {p.name for p in (out / name).iterdir()} == RESULT_FILES
        result = batch[name]
        assert result.proportions.index.is_unique and len(result.proportions) == slide.n_obs
        _assert_same(result, single_runs[name])
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_import_without_dask():
    """The core install: `import napari_stlnmf` and deconvolve never import dask, and
    deconvolve_many names the extra to install."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["dask"] = None  # any import of dask or distributed fails
        sys.modules["distributed"] = None
        import napari_stlnmf
        from napari_stlnmf import deconvolve, deconvolve_many, io
        from napari_stlnmf.cli import build_parser
        build_parser()
        from napari_stlnmf.errors import MissingDependencyError
        try:
            deconvolve_many({"a": "a.h5ad"}, "reference.h5ad")
        except MissingDependencyError as exc:
            print(exc)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'napari-stlnmf[distributed]'" in proc.stdout
    assert Path(sys.executable).exists()


def test_own_cluster_keeps_glibc_trim_no_profiler_slow_tick(monkeypatch):
    """deconvolve_many's LocalCluster does not give its workers dask's
    MALLOC_TRIM_THRESHOLD_=65536 (15-28 % slower fits), but keeps one the user set; its
    workers do not sample their stacks for a dashboard (3-4 % per fit), a default cluster's
    do; their event loops and the scheduler's tick once a second, not every 20 ms (~5 % of a
    batch: each tick takes the GIL from the fit)."""
    import distributed

    from napari_stlnmf.distributed import _local_cluster

    def trim():
        return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")

    def profiling(dask_worker):
        return "profile" in dask_worker.periodic_callbacks

    def tick_seconds(dask_worker=None, dask_scheduler=None):
        return (dask_worker or dask_scheduler)._tick_interval

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with _local_cluster(distributed, 1) as cluster, distributed.Client(cluster) as c:
        assert list(c.run(trim).values()) == [(None, "1")]
        assert list(c.run(profiling).values()) == [False]
        assert list(c.run(tick_seconds).values()) == [1.0]
        assert c.run_on_scheduler(tick_seconds) == 1.0
    default = distributed.LocalCluster(n_workers=1, dashboard_address=":0")
    with default as cluster, distributed.Client(cluster) as c:
        assert list(c.run(profiling).values()) == [True]
        assert list(c.run(tick_seconds).values()) == [0.02]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    with _local_cluster(distributed, 1) as cluster, distributed.Client(cluster) as c:
        assert list(c.run(trim).values()) == [("131072", "1")]


def test_own_local_cluster_with_progress_bar(slides, demo, single_runs, capsys):
    """client=None: deconvolve_many starts a LocalCluster of `workers` processes, shows a
    progress bar of the slides on stderr, and closes the cluster; same results as alone."""
    two = {k: slides[k] for k in ("slide3", "slide1")}
    batch = deconvolve_many(two, demo[1], cell_type_key=KEY, workers=2, seed=SEED)
    assert (batch.summary["status"] == "done").all()
    for name in two:
        _assert_same(batch[name], single_runs[name])
    err = capsys.readouterr().err
    assert "Slides" in err and "2/2" in err


def test_script_without_main_guard_is_refused_not_hung(slides, demo, tmp_path):
    """dask's workers start by re-running the caller's script ('spawn'): a script calling
    deconvolve_many at its top level would start a batch in every worker and wait for ever.
    It gets a BatchError naming the line before any worker starts; the same call under
    `if __name__ == '__main__':` (here inside a function called from there) runs."""
    paths = {}
    for name in ("slide0", "slide3"):
        paths[name] = str(tmp_path / f"{name}.h5ad")
        slides[name].write_h5ad(paths[name])
    reference = tmp_path / "reference.h5ad"
    demo[1].write_h5ad(reference)
    call = (
        f"batch = deconvolve_many({paths!r}, {str(reference)!r}, cell_type_key={KEY!r}, "
        "workers=2, progress=False)\n"
    )
    scripts = {
        "unguarded": "from napari_stlnmf import deconvolve_many\n" + call,
        "guarded": (
            "from napari_stlnmf import deconvolve_many\n\n\ndef run():\n    "
            + call
            + "    print(sorted(batch.summary['status']))\n\n\n"
            "if __name__ == '__main__':\n    run()\n"
        ),
    }
    runs = {}
    for kind, text in scripts.items():
        script = tmp_path / f"{kind}.py"
        script.write_text(text)
        runs[kind] = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
            check=False, cwd=tmp_path,
        )  # fmt: skip
    unguarded, guarded = runs["unguarded"], runs["guarded"]
    assert unguarded.returncode == 1
    assert "BatchError: deconvolve_many is called from line 2 of" in unguarded.stderr
    assert "if __name__ == '__main__':" in unguarded.stderr
    assert "Restarting worker" not in unguarded.stderr  # refused before any worker started
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.strip() == "['done', 'done']"
