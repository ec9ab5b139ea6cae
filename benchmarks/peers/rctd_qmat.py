"""Build rctd-py's Poisson-lognormal likelihood table (the "Q-matrices") locally.

rctd-py normally downloads a 404 MB ``q_matrices.npz`` from a GitHub release on
first use (``rctd._likelihood.load_cached_q_matrices``).  This machine has no
internet, so we compute the same table here and point ``$RCTD_Q_MATRICES`` at it.

The table is the one ``rctd._likelihood.compute_q_matrix(sigma, x_vals, K_val)``
computes (a port of spacexr's ``get_Q``/``calc_Q_mat_one``):

    Q[k, i] = log( max(1e-300, step * sum_j exp(-e^{Y_j} x_i + k Y_j + log p(Y_j)
                                               - lgamma(k+1) + k log x_i)) )

with the package's own grid (``build_x_vals``), heavy-tailed density
(``_ht_pdf_norm``), ``Y_j = j * 4e-3, j = -5000..5000``, for every sigma in
``rctd._sigma.SIGMA_ALL`` and ``K_val = RCTDConfig().K_val`` (1000), keys
``Q_<100*sigma>`` plus ``X_vals`` -- the layout ``RCTD.fit_platform_effects``
expects.  Calling ``compute_q_matrix`` directly takes ~1 min per sigma (126
sigmas, ~2 h on 2 cores), so the sum over Y is evaluated block-wise as small
matrix products with a log-sum-exp over blocks, which gives the same numbers
(checked against the package function to ~1e-13 relative, see ``--check``) in
about a second per sigma.

Run inside the rctd venv:  python rctd_qmat.py OUT.npz [--check]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from rctd._likelihood import _get_q_single, _ht_pdf_norm, build_x_vals
from rctd._sigma import SIGMA_ALL
from rctd._types import RCTDConfig
from scipy.special import gammaln

N_Y = 5000
GAMMA_STEP = 4e-3
BLOCK = 100  # Y points per block: k * (Y_j - Y_block0) <= 1002 * 0.396 < 709, no overflow


def q_matrix_fast(sigma: float, x_vals: np.ndarray, K_val: int) -> np.ndarray:
    Y = np.arange(-N_Y, N_Y + 1) * GAMMA_STEP
    log_p = np.log(np.maximum(_ht_pdf_norm(Y / sigma) / sigma, 1e-300))
    ks = np.arange(K_val + 3, dtype=np.float64)
    # A[j, i] = -exp(Y_j) x_i + log p(Y_j)
    A = np.outer(-np.exp(Y), x_vals) + log_p[:, None]
    logS = np.full((len(ks), len(x_vals)), -np.inf)
    for b0 in range(0, len(Y), BLOCK):
        sl = slice(b0, min(b0 + BLOCK, len(Y)))
        Ab = A[sl]
        m = Ab.max(axis=0)  # (N_X,)
        B = np.exp(Ab - m[None, :])  # <= 1
        E = np.exp(ks[:, None] * (Y[sl] - Y[b0])[None, :])  # (K, nb) <= e^397
        inner = E @ B  # (K, N_X) > 0
        with np.errstate(divide="ignore"):
            part = ks[:, None] * Y[b0] + m[None, :] + np.log(inner)
        np.logaddexp(logS, part, out=logS)
    logS += ks[:, None] * np.log(x_vals)[None, :] - gammaln(ks + 1)[:, None] + np.log(GAMMA_STEP)
    return np.maximum(logS, np.log(1e-300))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--check", action="store_true", help="compare with rctd's own get_Q")
    a = ap.parse_args(argv)
    x_vals = build_x_vals()
    K_val = int(RCTDConfig().K_val)
    if a.check:
        worst = 0.0
        for s in (10, 84, 200):
            Q = q_matrix_fast(s / 100, x_vals, K_val)
            for k in (0, 1, 3, 20, 150, 700, K_val + 2):
                ref = np.log(np.maximum(_get_q_single(x_vals, k, s / 100), 1e-300))
                err = np.max(np.abs(ref - Q[k]) / np.maximum(1.0, np.abs(ref)))
                worst = max(worst, err)
                print(f"sigma={s} k={k}: max rel err {err:.2e}")
        print(f"worst relative error vs rctd._likelihood._get_q_single: {worst:.2e}")
        if worst > 1e-9:
            return 1
    t = time.time()
    out = {"X_vals": x_vals}
    for s in SIGMA_ALL:
        out[f"Q_{int(s)}"] = q_matrix_fast(int(s) / 100, x_vals, K_val)
    np.savez(a.out, **out)
    print(
        f"wrote {len(out) - 1} Q-matrices ({K_val + 3} x {len(x_vals)}) to {a.out} "
        f"in {time.time() - t:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
