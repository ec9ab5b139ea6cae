"""Default run on the real-tissue sets with truth (seqfish_ob, osmfish_ss): RMSE and mean JSD on
both truths, the numbers a pipeline change must not worsen.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python real_tissue_check.py ['{"kw": 1}']

The optional argument: JSON keywords for ``deconvolve`` (an ablation).
"""

from __future__ import annotations

import json
import sys
import time

from datasets import real_tissue

from napari_stlnmf import deconvolve
from napari_stlnmf.metrics import mean_jensen_shannon, rmse


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options = json.loads(argv[0]) if argv else {}
    for name, slide, ref, key, truth, truth_mrna, _ in real_tissue():
        t0 = time.perf_counter()
        res = deconvolve(slide, ref, cell_type_key=key, seed=0, **options)
        scores = []
        for est, tru in ((res.proportions, truth), (res.mrna_fractions, truth_mrna)):
            e = est.reindex(index=tru.index, columns=tru.columns).fillna(0.0).to_numpy()
            scores += [rmse(e, tru.to_numpy()), mean_jensen_shannon(e, tru.to_numpy())]
        print(
            f"{name:45s} cells {scores[0]:.4f} (jsd {scores[1]:.4f})  "
            f"mRNA {scores[2]:.4f} (jsd {scores[3]:.4f})  {time.perf_counter() - t0:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
