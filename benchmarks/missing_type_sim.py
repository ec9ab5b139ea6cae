"""A cell type left out of the reference, on simulated slides: does the misfit flag find where it
lived (issue 20, "Done means")?

Slides of the simulator (hex 22 x 22, ~8 cells per spot, platform effect σ 0.3) from synthetic
references of 8 and 12 types whose slide cells are another draw of the same types, kinds
``regions`` and ``smooth``, 3,000 counts per spot; for each, three types in turn are dropped from
the reference. "Where it lived": true cell fraction ≥ 0.1. Precision = flagged spots that are
such spots; recall = such spots that are flagged; "named" = the largest flagged region is named
after the left-out type (gene sets: the FULL reference's 30 top markers per type, as a user with
a marker table would give them). Run: ``OMP_NUM_THREADS=1 python benchmarks/missing_type_sim.py
[--write]`` (~2 min); ``--write`` adds the table to docs/bench_missing_type.md.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_suite import _reference, _slide

from napari_stlnmf import deconvolve
from napari_stlnmf.datasets import hex_layout
from napari_stlnmf.diagnostics import reference_marker_sets
from napari_stlnmf.simulate import simulate_slide

KEY = "cell_type"
SLIDES = [(8, 7, "regions", 0), (8, 7, "smooth", 1), (12, 7, "regions", 2), (12, 31, "smooth", 3)]
MARKER = "<!-- simulations -->"


def main() -> None:
    rows = []
    xy = hex_layout(22, 22, pitch=100.0)
    for n_types, ref_seed, kind, seed in SLIDES:
        ref, cells = _reference(n_types, ref_seed)
        sim = simulate_slide(
            xy, cells, kind=kind, library_sizes=np.array([3000.0]), mean_cells=8.0,
            platform_sigma=0.3, seed=seed,
        )  # fmt: skip
        slide = _slide(sim.counts, xy, cells.genes)
        truth = pd.DataFrame(sim.cell_fractions, index=slide.obs_names, columns=cells.cell_types)
        markers = reference_marker_sets(ref, 30, cell_type_key=KEY)
        # the three most abundant types: a missing type that fills no spot cannot be found
        for left in truth.mean().sort_values(ascending=False).index[:3]:
            kept = ref[ref.obs[KEY].astype(str) != left].copy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = deconvolve(
                    slide, kept, cell_type_key=KEY, seed=0, diagnose=True,
                    marker_gene_sets=markers,
                )  # fmt: skip
            flagged = res.diagnostics["poorly_explained"].to_numpy()
            lived = truth[left].to_numpy() >= 0.1
            regions = res.unexplained_regions
            named = bool(len(regions)) and regions.iloc[0]["population"] == left
            rows.append(
                {
                    "slide": f"{n_types} types, {kind}, seed {seed}",
                    "left out": left,
                    "spots where it lived": int(lived.sum()),
                    "flagged": int(flagged.sum()),
                    "precision": (flagged & lived).sum() / max(flagged.sum(), 1),
                    "recall": (flagged & lived).sum() / max(lived.sum(), 1),
                    "largest region named after it": "yes" if named else "no",
                }
            )
            print(rows[-1], flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = deconvolve(slide, ref, cell_type_key=KEY, seed=0, diagnose=True)
        rows.append(
            {
                "slide": f"{n_types} types, {kind}, seed {seed}",
                "left out": "none (full reference)",
                "spots where it lived": 0,
                "flagged": int(full.diagnostics["poorly_explained"].sum()),
                "precision": np.nan,
                "recall": np.nan,
                "largest region named after it": "–",
            }
        )
    df = pd.DataFrame(rows)
    left = df[df["left out"] != "none (full reference)"]
    fmt = lambda v: "–" if not np.isfinite(v) else f"{v:.2f}"
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for r in df.itertuples(index=False):
        cells = [str(v) if not isinstance(v, float) else fmt(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"| **mean of {len(left)}** | | | | **{left['precision'].mean():.2f}** | "
        f"**{left['recall'].mean():.2f}** | {int((left.iloc[:, -1] == 'yes').sum())} of "
        f"{len(left)} |"
    )
    print("\n".join(lines))
    if "--write" in sys.argv:
        out = Path(__file__).resolve().parents[1] / "docs" / "bench_missing_type.md"
        text = out.read_text() if out.exists() else ""
        text = text.split(MARKER)[0].rstrip() + "\n\n" + MARKER + "\n"
        text += (
            "### On simulations\n\n"
            "`OMP_NUM_THREADS=1 python benchmarks/missing_type_sim.py --write`: "
            + __doc__.split("\n\n")[1].replace("\n", " ")
            + "\n\n"
            + "\n".join(lines)
            + "\n"
        )
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
