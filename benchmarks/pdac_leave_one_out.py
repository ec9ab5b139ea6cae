"""PDAC-A with one type left out of the signature: does the misfit flag light up where that
type lives (issue 20, missing-type diagnosis on real tissue)?

For each left-out type: the share of spots flagged ``poorly_explained`` per pathologist region
(with the full signature as the baseline), and the largest region's top residual genes and the
population they mark (named from the FULL signature's own markers, as a user with a gene-set
table would). Run: ``OMP_NUM_THREADS=1 python benchmarks/pdac_leave_one_out.py`` (~1 min);
``--write``: docs/bench_missing_type.md, a section of docs/benchmarks.md."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_tissue_diagnosis import load_set

from napari_stlnmf import deconvolve
from napari_stlnmf.diagnostics import reference_marker_sets

LEFT_OUT = (None, "Acinar_cells", "Cancer_clone_A", "Cancer_clone_B")


def main() -> None:
    d = load_set("pdac_a_card")
    slide, signature, regions = d["slide"], d["reference"], d["regions"]
    regions = regions.reindex(slide.obs_names)
    markers = reference_marker_sets(signature, 30)
    rows = []
    for left in LEFT_OUT:
        ref = signature if left is None else signature.drop(columns=left)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = deconvolve(slide, ref, seed=0, diagnose=True, marker_gene_sets=markers)
        flagged = res.diagnostics["poorly_explained"]
        row = {"left out": left or "none (full signature)"}
        for region, share in flagged.groupby(regions.to_numpy()).mean().items():
            row[region] = f"{share:.0%}"
        top = res.unexplained_regions
        if len(top):
            first = top.sort_values("n_spots", ascending=False).iloc[0]
            genes = ", ".join(str(first["residual_genes"]).split(";")[:5])
            row["largest region"] = f"{int(first['n_spots'])} spots: {genes}"
            row["named"] = first["population"] or "–"
        rows.append(row)
    table = pd.DataFrame(rows).fillna("")
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in table.itertuples(index=False)]
    print("\n".join(lines))
    if "--write" in sys.argv:
        section = [
            "## Missing cell types on real tissue (PDAC-A, one type left out)",
            "",
            (
                "`OMP_NUM_THREADS=1 python benchmarks/pdac_leave_one_out.py --write`: "
                "`deconvolve(slide, signature, seed=0, diagnose=True, marker_gene_sets=...)` "
                "with one type dropped from the signature; per pathologist region the share of "
                "spots flagged poorly explained (misfit z > 3), the largest flagged region's top "
                "residual genes and the population they mark (named from the full signature's "
                "30 top markers per type)."
            ),
            "",
            *lines,
        ]
        out = Path(__file__).resolve().parents[1] / "docs" / "bench_missing_type.md"
        out.write_text("\n".join(section) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
