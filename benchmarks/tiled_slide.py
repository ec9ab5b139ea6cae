"""A slide in tiles (``deconvolve_tiled``) against the whole slide in one fit.

Synthetic Visium HD folders (Space Ranger layout: ``square_XXXum/filtered_feature_bc_matrix.h5``
+ ``spatial/tissue_positions.parquet`` + scale factors; no image), square grids of bins whose
composition varies smoothly over ~40 bins (20 cell types, 2,000 genes, the scaling benchmark's
reference), written to a scratch folder once:

* ``1m``: 1000 x 1000 bins of 8 µm, 150 counts per bin. Runs: the whole slide
  (``deconvolve``), and ``deconvolve_tiled`` (tiles of 700 bins, calibration on 200,000 bins)
  with the exact halo (the layers plus the head's steps: no spot beyond it can change an
  interior spot), with one tile (the whole slide under the same calibration) and with halos of
  0 to 48 hops. Reported: the largest and mean absolute differences of the proportions.
* ``4m``: 2000 x 2000 bins of 2 µm, 10 counts per bin, tiled on a LocalCluster of 2 workers
  (1 thread each): time per 10^6 bins and the peak resident memory of the whole process tree
  (this process and the workers).

Each run is a fresh process (its own peak memory), ``OMP_NUM_THREADS=1``. Writes
``docs/bench_tiled.md`` and prints it.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python tiled_slide.py [--scratch DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
KEY = "cell_type"
MICRONS_PER_PIXEL = 0.2738
# side in bins, bin µm, counts per bin
SLIDES = {"1m": (1000, 8, 150), "low": (240, 2, 10), "4m": (2000, 2, 10)}
SWEEP_TILE = {"1m": 700, "low": 80}
# the halo the others are compared with: exact, or (a slide smaller than the exact halo) 48
REFERENCE_HALO = {"1m": "exact", "low": "48"}
HALOS = (0, 8, 16, 24, 48)
TITLES = {
    "1m": "10^6 bins (1000 x 1000 of 8 µm, 150 counts per bin, 20 types): tiles vs one fit",
    "low": "Few counts (240 x 240 bins of 2 µm, 10 counts per bin): how far the graph reaches",
    "4m": "4 x 10^6 bins (2000 x 2000 of 2 µm, 10 counts per bin, 20 types)",
}


def smooth_composition(side: int, n_types: int, rng, scale: int = 40) -> np.ndarray:
    """bins x types fractions varying smoothly over ~``scale`` bins, plus per-bin noise."""
    from scipy.ndimage import gaussian_filter, zoom

    coarse = max(side // scale, 2) * 2
    V = np.empty((side * side, n_types), np.float32)
    for k in range(n_types):
        field = gaussian_filter(rng.normal(size=(coarse, coarse)), 1.0)
        V[:, k] = zoom(field, side / coarse, order=1)[:side, :side].ravel()
    V = np.exp(3 * (V - V.max(1, keepdims=True)))
    V /= V.sum(1, keepdims=True)
    noise = rng.dirichlet(np.full(n_types, 0.3), size=side * side).astype(np.float32)
    return 0.8 * V + 0.2 * noise


def write_hd_folder(root: Path, side: int, bin_um: int, counts_per_bin: int) -> Path:
    """Write the synthetic slide and its reference; returns the bin folder."""
    import h5py

    from napari_stlnmf.datasets import make_reference
    from napari_stlnmf.preprocess import build_reference

    sys.path.insert(0, str(HERE))
    from scaling_worker import sparse_counts

    folder = root / "outs" / "binned_outputs" / f"square_{bin_um:03d}um"
    done = folder / "filtered_feature_bc_matrix.h5"
    if done.is_file() and (root / "reference.h5ad").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ref = make_reference(n_types=20, n_genes=2000, cells_per_type=60, seed=1)
    ref.write_h5ad(root / "reference.h5ad")
    R = build_reference(ref, cell_type_key=KEY)
    V = smooth_composition(side, 20, rng)
    X = sparse_counts(V, R.profiles.to_numpy(), counts_per_bin, rng)  # bins x genes CSR
    del V
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    r, c = np.divmod(np.arange(side * side), side)
    barcodes = np.char.add(
        np.char.add(np.char.add(f"s_{bin_um:03d}um_", np.char.zfill(r.astype(str), 5)), "_"),
        np.char.add(np.char.zfill(c.astype(str), 5), "-1"),
    )
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": np.ones(side * side, np.int32),
            "array_row": r.astype(np.int32),
            "array_col": c.astype(np.int32),
            "pxl_row_in_fullres": (r + 0.5) * bin_um / MICRONS_PER_PIXEL,
            "pxl_col_in_fullres": (c + 0.5) * bin_um / MICRONS_PER_PIXEL,
        }
    ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    scalefactors = {
        "spot_diameter_fullres": bin_um / MICRONS_PER_PIXEL,
        "bin_size_um": float(bin_um),
        "microns_per_pixel": MICRONS_PER_PIXEL,
        "tissue_hires_scalef": 0.08,
        "tissue_lowres_scalef": 0.02,
    }
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    partial = folder / "partial.h5"
    with h5py.File(partial, "w") as f:  # CSR of bins x genes = CSC of genes x bins
        grp = f.create_group("matrix")
        grp["data"] = X.data.astype(np.int32)
        grp["indices"] = X.indices.astype(np.int64)
        grp["indptr"] = X.indptr.astype(np.int64)
        grp["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        grp["barcodes"] = barcodes.astype("S")
        feats = grp.create_group("features")
        feats["name"] = np.array(list(ref.var_names), dtype="S")
        feats["id"] = np.array([f"ENSG{i:05d}" for i in range(X.shape[1])], dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * X.shape[1], dtype="S")
    partial.rename(done)
    return folder


def run_one(args) -> dict:
    """One measurement (in its own process): proportions saved to ``args.save``."""
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from napari_stlnmf import deconvolve
    from napari_stlnmf.tiling import deconvolve_tiled

    folder, reference = Path(args.folder), str(Path(args.root) / "reference.h5ad")
    common = {"cell_type_key": KEY, "n_markers": 100, "seed": 0}
    t0 = time.perf_counter()
    if args.mode == "whole":
        result = deconvolve(folder, reference, **common)
        info = {}
    else:
        client, cluster = None, None
        if args.workers:
            import distributed

            from napari_stlnmf.distributed import _local_cluster

            cluster = _local_cluster(distributed, args.workers)
            client = distributed.Client(cluster)
        try:
            halo = {} if args.halo == "default" else {"halo": None}
            if args.halo not in ("default", "exact"):
                halo = {"halo": int(args.halo)}
            result = deconvolve_tiled(
                folder, reference, tile_size=args.tile_size, client=client, **halo, **common
            )
        finally:
            if client is not None:
                client.close()
                cluster.close()
        info = result.info["tiling"]
    seconds = time.perf_counter() - t0
    np.save(args.save, result.proportions.to_numpy(np.float32))
    return {"seconds": seconds, "n_bins": len(result.proportions), **info}


def tree_rss_mb(pid: int) -> float:
    sys.path.insert(0, str(HERE))
    from scaling_worker import _tree_rss_mb

    return _tree_rss_mb(pid)


def measure(root: Path, folder: Path, save: Path, **options) -> dict:
    """A fresh process of :func:`run_one`, its process tree's peak memory watched; a run
    already measured (its ``.json`` next to ``save``) is read back instead."""
    cached = save.with_suffix(".json")
    if cached.is_file() and save.is_file():
        return json.loads(cached.read_text())
    argv = [sys.executable, __file__, "--one", "--root", str(root), "--folder", str(folder)]
    argv += ["--save", str(save)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.25)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    record = json.loads(out.strip().splitlines()[-1])
    record["peak_gb"] = peak / 1024
    cached.write_text(json.dumps(record))
    print("  ", {k: v for k, v in record.items() if k != "tile_seconds"}, flush=True)
    return record


def differences(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    d = np.abs(a.astype(np.float64) - b)
    return float(np.nanmax(d)), float(np.nanmean(d)), float(np.nanquantile(d, 0.999))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/stlnmf_tiled"))
    parser.add_argument("--only", choices=sorted(SLIDES), default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("root", str), ("folder", str), ("save", str), ("mode", str)):
        parser.add_argument(f"--{name}", type=kind, default="tiled" if name == "mode" else None)
    parser.add_argument("--tile-size", type=int, default=700)
    parser.add_argument("--halo", default="default")  # "exact", or hops
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    parts = {}
    for name in (args.only,) if args.only else SLIDES:
        side, bin_um, counts = SLIDES[name]
        root = args.scratch / name
        t0 = time.perf_counter()
        folder = write_hd_folder(root, side, bin_um, counts)
        print(f"-- {name}: {side}x{side} bins in {folder} ({time.perf_counter() - t0:.0f} s)")
        out = root / "runs"
        out.mkdir(exist_ok=True)
        if name == "4m":
            rec = measure(root, folder, out / "w2.npy", workers=2)
            label = f"tiles of 700, halo {rec['halo_hops']} hops (the default), 2 workers"
            parts[name] = [(label, rec)]
        else:
            parts[name] = halo_sweep(
                root, folder, out, side, tile=SWEEP_TILE[name], against=REFERENCE_HALO[name]
            )
        (args.scratch / f"{name}.rows.json").write_text(json.dumps(parts[name]))
    for name in SLIDES:  # the parts measured in an earlier call
        cached = args.scratch / f"{name}.rows.json"
        if name not in parts and cached.is_file():
            parts[name] = json.loads(cached.read_text())
    write_page(parts)


def halo_sweep(root: Path, folder: Path, out: Path, side: int, tile: int, against: str) -> list:
    """The whole slide, one tile, the halo ``against`` (exact, or a number of hops) and the
    halos of HALOS: their differences from ``against`` and from the whole slide."""
    whole = measure(root, folder, out / "whole.npy", mode="whole")
    ref = measure(root, folder, out / f"{against}.npy", halo=against, tile_size=tile)
    one = measure(root, folder, out / "one.npy", halo="exact", tile_size=side + 1)
    P = {k: np.load(out / f"{k}.npy") for k in ("whole", against, "one")}
    what = f"exact halo ({ref['halo_hops']} hops)" if against == "exact" else f"halo {against}"
    rows = [
        ("whole slide, one fit (`deconvolve`)", whole, None, None),
        ("one tile: the whole slide under the sampled calibration", one,
         differences(P["one"], P[against]), differences(P["one"], P["whole"])),
        (f"tiles of {tile}, {what}: the reference", ref,
         differences(P[against], P[against]), differences(P[against], P["whole"])),
    ]  # fmt: skip
    for halo in HALOS:
        if str(halo) == against:
            continue
        rec = measure(root, folder, out / f"halo{halo}.npy", halo=halo, tile_size=tile)
        Ph = np.load(out / f"halo{halo}.npy")
        rows.append(
            (f"tiles of {tile}, halo {halo} hops", rec, differences(Ph, P[against]),
             differences(Ph, P["whole"]))
        )  # fmt: skip
    return rows


READING = [
    "**How the halo was chosen.** The graph's reach is far shorter than the exact halo: on both",
    "slides a halo of 8 hops already gives the exact-halo (or 48-hop) answer to float precision,",
    "0 hops does not (max 0.08-0.09 at the tiles' borders). The default, 16 hops, is twice that,",
    "at ~30 % more bins per tile of 700 instead of the exact halo's 2.1x. What tiling changes",
    "against one fit of the whole slide is the calibration measured on a sample: mean 2.5e-7,",
    "99.9 % 2.2e-6, max 0.071 on the 10^6-bin slide (a proportion crossing the zeroing threshold",
    "at one bin). The 10^6-bin sweep ran before ω was fixed once per slide (it is not damped on",
    "that slide, so the change does not touch it); the few-counts slide damps ω and was run",
    "after. **Scale.** 4 x 10^6 bins in 10.5 GB for the whole process tree (the 16 GB target),",
    "152 s per 10^6 bins on 2 workers; one fit of 10^6 bins needs 6.4 GB. On a real cluster:",
    "`stlnmf tiled --slide SAMPLE/outs --bin-size 2 --reference ref.h5ad --cell-type-key",
    "cell_type --out results --scheduler tcp://HOST:8786` (the slide on a file system the",
    "workers share; each task reads its tile's bins from the `.h5`).",
    "",
]


def write_page(parts: dict) -> None:
    lines = [
        "## One slide in tiles (dask)",
        "",
        (
            f"`benchmarks/tiled_slide.py` on {platform.node()} ({os.cpu_count()} cores), "
            "OMP_NUM_THREADS=1, each run a fresh process; peak = resident memory of the "
            "process and its dask workers. Differences: of the proportions (cell fractions) "
            "over all bins, max / mean / 99.9th percentile; the exact halo is the layers plus "
            "the cell-fraction head's steps plus one, beyond which no bin can reach an interior "
            "bin; the calibration is measured on a seeded sample of 200,000 bins (all bins when "
            "fewer)."
        ),
        "",
    ]

    def fmt(d):
        return "—" if d is None else f"{d[0]:.2g} / {d[1]:.2g} / {d[2]:.2g}"

    for name in SLIDES:
        if name not in parts:
            continue
        lines += [f"### {TITLES[name]}", ""]
        if name == "4m":
            lines += ["| run | tiles | s | s per 10^6 bins | peak GB |", "|---|---|---|---|---|"]
            for label, rec in parts[name]:
                per = rec["seconds"] / (rec["n_bins"] / 1e6)
                lines.append(
                    f"| {label} | {rec['tiles']} | {rec['seconds']:.0f} | {per:.0f} | "
                    f"{rec['peak_gb']:.1f} |"
                )
        else:
            lines += [
                "| run | tiles | s | peak GB | vs the reference halo | vs whole slide |",
                "|---|---|---|---|---|---|",
            ]
            for label, rec, d_exact, d_whole in parts[name]:
                lines.append(
                    f"| {label} | {rec.get('tiles', 1)} | {rec['seconds']:.0f} | "
                    f"{rec['peak_gb']:.1f} | {fmt(d_exact)} | {fmt(d_whole)} |"
                )
        lines.append("")
    lines += READING
    text = "\n".join(lines)
    (DOCS / "bench_tiled.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
