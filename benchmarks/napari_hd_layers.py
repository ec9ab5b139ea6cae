"""How a headless napari holds the results of a Visium HD-sized slide (issue 18's targets).

A synthetic 8 µm slide of ``--bins`` square bins (a square grid, Space Ranger's scale factors)
with Dirichlet proportions over ``--types`` types stands in for a deconvolution's output (the
fit itself is benchmarked elsewhere). Measured in one process: building the layer data
(:func:`napari_stlnmf.layers.result_layers`), adding the layers to a shown viewer and drawing
the first frame (a canvas screenshot), the extra RSS over the result (peak, sampled), the
layers' data in tables' worth (unique arrays and tables over the results table's size), and
switching the shown type with the dock's picker function (recolour + draw).

Run under a display: ``xvfb-run -a -s "-screen 0 1400x900x24" python
benchmarks/napari_hd_layers.py``.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
from anndata import AnnData

BIN_UM = 8.0
MICRONS_PER_PIXEL = 0.2738  # a Space Ranger HD full-resolution pixel


def hd_slide(n_bins: int, n_types: int, seed: int = 0):
    """A square grid of ``n_bins`` 8 µm bins with smooth-ish random proportions."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_bins)))
    rows, cols = np.divmod(np.arange(n_bins), side)
    step = BIN_UM / MICRONS_PER_PIXEL
    xy = np.column_stack([cols * step + 500.0, rows * step + 500.0])
    names = [f"s_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    slide = AnnData(
        X=sp.csr_matrix((n_bins, 1), dtype=np.float32),
        obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=names),
    )
    slide.obsm["spatial"] = xy
    slide.uns["spatial"] = {
        "hd": {
            "images": {},
            "scalefactors": {
                "bin_size_um": BIN_UM,
                "microns_per_pixel": MICRONS_PER_PIXEL,
                "spot_diameter_fullres": step,
                "tissue_hires_scalef": 0.05,
            },
        }
    }
    # types in patches, so the maps look like tissue rather than noise
    centres = rng.uniform(0, side, size=(n_types, 2))
    d2 = ((np.column_stack([rows, cols])[:, None, :] - centres[None]) ** 2).sum(-1)
    alpha = 0.2 + 5.0 * np.exp(-d2 / (2 * (side / 6) ** 2))
    props = rng.gamma(alpha.astype(np.float64))
    props /= props.sum(1, keepdims=True)
    types = [f"type {i:02d}" for i in range(n_types)]
    proportions = pd.DataFrame(props, index=names, columns=types)
    fit_error = pd.Series(rng.uniform(0.2, 0.6, n_bins), index=names)
    qc = pd.Series("ok", index=names)
    return slide, proportions, fit_error, qc


class PeakRSS:
    """The process' RSS sampled every 20 ms in a thread; ``peak`` in bytes."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def unique_bytes(layers, table) -> int:
    """Bytes of the layers' distinct arrays and tables (one object counted once)."""
    seen, total = set(), 0
    for layer in layers:
        objects = [layer.data, getattr(layer, "features", None)]
        objects += [v for v in layer.metadata.values() if isinstance(v, np.ndarray | pd.DataFrame)]
        for obj in objects:
            if obj is None or id(obj) in seen or (isinstance(obj, pd.DataFrame) and obj.empty):
                continue
            seen.add(id(obj))
            if isinstance(obj, pd.DataFrame):
                total += int(obj.memory_usage(deep=True).sum())
            else:
                total += int(np.asarray(obj).nbytes)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bins", type=int, default=700_000)
    parser.add_argument("--types", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screenshot", help="save the first frame as this PNG")
    parser.add_argument(
        "--write", action="store_true", help="write docs/bench_napari_hd.md (a section of the page)"
    )
    args = parser.parse_args()

    import napari

    from napari_stlnmf._napari.widget import show_cell_type
    from napari_stlnmf.layers import PROPORTION_ROLE, RESULT_TAG, TABLE_KEY, result_layers

    slide, proportions, fit_error, qc = hd_slide(args.bins, args.types, args.seed)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1200, 800)
    viewer.screenshot(canvas_only=True)  # the empty viewer's first frame: not ours
    base_rss = psutil.Process().memory_info().rss

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        data = result_layers(proportions, fit_error, qc, slide, slide_name="HD")
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        layers = []
        for array, kwargs, kind in data:
            layers.append(getattr(viewer, f"add_{kind}")(array, **kwargs))
        viewer.reset_view()
        frame = viewer.screenshot(canvas_only=True)
        t_show = time.perf_counter() - t0
    table = layers[0].metadata[TABLE_KEY]
    table_bytes = int(table.memory_usage(deep=True).sum())
    layer_bytes = unique_bytes(layers, table)

    prop_layer = next(la for la in layers if la.metadata[RESULT_TAG]["role"] == PROPORTION_ROLE)
    switches = []
    for t in proportions.columns[1:6]:
        t0 = time.perf_counter()
        show_cell_type(prop_layer, t)
        viewer.screenshot(canvas_only=True)
        switches.append(time.perf_counter() - t0)
    assert frame[..., :3].std() > 5, "the first frame is blank"
    if args.screenshot:
        from PIL import Image

        Image.fromarray(np.asarray(frame[..., :3], dtype=np.uint8)).save(args.screenshot)

    ratio = layer_bytes / table_bytes
    rows = [
        ("layers", ", ".join(f"{la.name} ({type(la).__name__})" for la in layers), "at most a few"),
        ("layer data built (s)", f"{t_build:.2f}", ""),
        ("layers added + first frame drawn (s)", f"{t_show:.2f}", ""),
        ("built + drawn (s)", f"{t_build + t_show:.2f}", "≤ 20"),
        ("extra RSS, peak (GiB)", f"{(rss.peak - base_rss) / 2**30:.2f}", "≤ 4"),
        ("results table (MiB)", f"{table_bytes / 2**20:.1f}", ""),
        ("layer data (MiB, tables)", f"{layer_bytes / 2**20:.1f} ({ratio:.2f})", "≤ 3 tables"),
        ("switch the shown type (s, median of 5)", f"{np.median(switches):.3f}", "≤ 1"),
    ]
    table_md = ["| what | measured | target |", "|---|---|---|"]
    table_md += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    print(f"bins {args.bins:,} x types {args.types}; napari {napari.__version__}")
    print("\n".join(table_md))
    if args.write:
        from pathlib import Path

        section = [
            "## napari at Visium HD scale",
            "",
            (
                f"A synthetic 8 µm slide of {args.bins:,} square bins x {args.types} types "
                "(Dirichlet proportions in patches; the fit itself is in the speed table), its "
                f"results shown in a headless napari {napari.__version__} under Xvfb, one "
                'process: `xvfb-run -a -s "-screen 0 1400x900x24" python '
                f"benchmarks/napari_hd_layers.py --bins {args.bins} --types {args.types} "
                "--write`. The bins are the pixels of their grid (two Image layers and one "
                "Labels layer sharing one table); the dock's picker recolours the one map."
            ),
            "",
            *table_md,
        ]
        out = Path(__file__).resolve().parents[1] / "docs" / "bench_napari_hd.md"
        out.write_text("\n".join(section) + "\n")
        print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main()
