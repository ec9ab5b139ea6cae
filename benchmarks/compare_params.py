"""Parameter files side by side on real tissue and on near-pure slides: what a change of the
shipped parameters (``benchmarks/train_defaults.py``) does, before it is shipped.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python compare_params.py \\
        shipped ../src/napari_stlnmf/data/default_params.pt  candidate /tmp/candidate.pt

Per file: the real sets with truth (RMSE cells vs cells, mRNA vs mRNA), the PDAC regions (mean
share of each region's expected types, cell fractions) and the near-pure slides of
``near_pure.py`` (5 seeds per reference; FlashDeconv's RMSE read from docs/bench_near_pure.csv,
it does not depend on our parameters). The held-out simulated suite is
``accuracy_suite.py --variants untrained --extra 'NAME={"params": "PATH"}'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import PDAC_EXPECTED, load_pdac, real_tissue
from near_pure import REAL, SYNTHETIC, make_slide, real_halves, scores, synthetic_reference
from run_benchmarks import region_rows

from napari_stlnmf import deconvolve

KEY = "cell_type"
ROOT = Path(__file__).resolve().parents[1]


def real_rows(params) -> dict:
    out = {}
    for name, slide, ref, key, truth, truth_mrna, _ in real_tissue():
        res = deconvolve(slide, ref, cell_type_key=key, seed=0, params=params)
        short = name.split("(")[-1].rstrip(")")
        out[f"{short} cells"] = scores(res.proportions, truth)[0]
        out[f"{short} mRNA"] = scores(res.mrna_fractions, truth_mrna)[0]
    _, slide, sig, regions, _ = load_pdac()
    res = deconvolve(slide, sig, seed=0, params=params)
    for row in region_rows(res.proportions, regions, PDAC_EXPECTED):
        out[f"pdac {row['region']}"] = row["expected_share"]
    return out


def near_pure_rows(params, seeds=range(5)) -> dict:
    out = {}
    for rname in [*SYNTHETIC, *REAL]:
        ref, cells = (
            synthetic_reference(*SYNTHETIC[rname]) if rname in SYNTHETIC else real_halves(rname)
        )
        vals = []
        for seed in seeds:
            slide, truth, _, _, _ = make_slide(cells, seed)
            res = deconvolve(slide, ref, cell_type_key=KEY, seed=0, params=params)
            vals.append(scores(res.proportions, truth)[0])
        out[f"near-pure {rname}"] = float(np.mean(vals))
    return out


def main(argv):
    names, paths = argv[0::2], argv[1::2]
    table = {}
    for name, path in zip(names, paths, strict=True):
        row = real_rows(path)
        row.update(near_pure_rows(path))
        table[name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    df = pd.DataFrame(table)
    fd = pd.read_csv(ROOT / "docs" / "bench_near_pure.csv")
    df["FlashDeconv"] = pd.Series(
        {f"near-pure {r}": g["flash_mrna_rmse"].mean() for r, g in fd.groupby("reference")}
    )
    print(df.round(4).to_string())


if __name__ == "__main__":
    main(sys.argv[1:])
