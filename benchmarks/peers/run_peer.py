#!/usr/bin/env python
"""Run one peer deconvolution method on a slide + single-cell reference.

Runs INSIDE the peer's own venv (see install.sh), e.g.

    benchmarks/.venvs/flashdeconv/bin/python benchmarks/peers/run_peer.py \
        --method flashdeconv --slide slide.h5ad --reference ref.h5ad \
        --cell-type-key cell_type --out props.csv [--epochs N] [--seed 0]

Inputs
    slide.h5ad  spots x genes integer counts in .X, coordinates in .obsm['spatial']
    ref.h5ad    cells x genes integer counts in .X, labels in .obs[cell_type_key]

Outputs
    props.csv       spots x cell types (index = slide obs_names, columns = cell
                    types sorted), rows summing to 1
    props.csv.json  sidecar: wall time, peak RSS, package version, parameters,
                    and which quantity the method estimates

Exit codes: 0 ok, 1 the method crashed (traceback on stderr), 2 bad usage/input,
3 the method cannot run here (one-line reason on stderr, also in the sidecar).

Each method uses its documented defaults (read from the installed package);
where we deviate (fewer epochs on CPU, ...) the sidecar says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from importlib import metadata


def _early_threads() -> int:
    """Pin BLAS/OpenMP/numba/torch thread pools BEFORE numpy/torch are imported.

    Default 1 (override: --threads N or $PEER_THREADS).  On this 2-core box the SGD
    peers (scvi-tools, pyro, tangram) ran 5-8x faster with 1 thread than with 2 when
    anything else was running, because of thread oversubscription.
    """
    n = os.environ.get("PEER_THREADS", "1")
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            n = sys.argv[i + 1]
        elif arg.startswith("--threads="):
            n = arg.split("=", 1)[1]
    try:
        n = max(1, int(n))
    except ValueError:
        n = 1
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMBA_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        os.environ[var] = str(n)
    return n


N_THREADS = _early_threads()

import numpy as np

METHOD_GROUP = {
    "flashdeconv": "flashdeconv",
    "rctd": "rctd",
    "cell2location": "scvi",
    "stereoscope": "scvi",
    "destvi": "scvi",
    "tangram": "tangram",
}
METHOD_PACKAGE = {
    "flashdeconv": "flashdeconv",
    "rctd": "rctd-py",
    "cell2location": "cell2location",
    "stereoscope": "scvi-tools",
    "destvi": "scvi-tools",
    "tangram": "tangram-sc",
}
# Default epochs where the method trains by SGD.  None = package default.
DEFAULT_EPOCHS = {
    # cell2location tutorial: reference 250 epochs, spatial 30000 (GPU).  On 2 CPU
    # cores we use 10000 spatial epochs by default (override with --epochs).
    "cell2location": 10000,
    "stereoscope": None,  # sc: package default 400; spatial: ~30000 steps (see run_stereoscope)
    "destvi": None,  # CondSCVI.train default 300, DestVI.train default 2000
    "tangram": None,  # map_cells_to_space default num_epochs=1000
}


class PeerUnavailable(Exception):
    """The method cannot run on this machine / with these inputs (exit code 3)."""


# ----------------------------------------------------------------------------- utils
def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x)


def _as_counts(adata, what: str):
    """Return a copy with float32 CSR/dense integer counts in .X, checked."""
    import scipy.sparse as sp

    X = adata.X
    vals = X.data if sp.issparse(X) else np.asarray(X)
    if vals.size and (np.any(vals < 0) or not np.allclose(vals, np.round(vals))):
        raise SystemExit(f"run_peer: {what}.X must hold non-negative integer counts")
    ad = adata.copy()
    ad.X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)
    ad.var_names_make_unique()
    return ad


def _common_genes(slide, ref):
    genes = [g for g in slide.var_names if g in set(ref.var_names)]
    if len(genes) < 10:
        raise SystemExit(f"run_peer: only {len(genes)} genes shared by slide and reference")
    return slide[:, genes].copy(), ref[:, genes].copy()


def _rss_mb() -> dict:
    # ru_maxrss is in kB on Linux.  children = waited-for subprocesses (e.g. torch
    # compile workers).  peak_rss_mb = self + children, a conservative upper bound.
    s = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {
        "peak_rss_mb": round(s + c, 1),
        "peak_rss_mb_self": round(s, 1),
        "peak_rss_mb_children": round(c, 1),
    }


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
        torch.set_num_threads(N_THREADS)
    except ImportError:
        pass


# ----------------------------------------------------------------------------- methods
# Each returns (DataFrame spots x types [unnormalised ok], params dict, info dict).


def run_flashdeconv(slide, ref, key, a):
    import flashdeconv as fd

    slide, ref = _common_genes(slide, ref)
    # documented Scanpy-style API with its defaults (log_cpm, knn k=6, lambda auto, ...)
    fd.tl.deconvolve(slide, ref, cell_type_key=key, random_state=a.seed)
    props = slide.obsm["flashdeconv"]
    params = dict(slide.uns["flashdeconv_params"])
    params.pop("cell_type_names", None)
    info = {
        "quantity": "mRNA fraction (approx.): row-normalised non-negative regression "
        "coefficients of log-CPM spot profiles on library-normalised "
        "cell-type signatures"
    }
    return props, params, info


def run_rctd(slide, ref, key, a):
    import pandas as pd
    import rctd

    qpath = os.environ.get("RCTD_Q_MATRICES") or os.path.join(sys.prefix, "q_matrices.npz")
    if not os.path.exists(qpath):
        raise PeerUnavailable(
            f"rctd-py likelihood table missing ({qpath}); it is normally downloaded and there is "
            "no internet: run `bash benchmarks/peers/install.sh rctd` (builds it locally)"
        )
    os.environ["RCTD_Q_MATRICES"] = qpath
    compile_ = os.environ.get("RCTD_COMPILE", "0") == "1"
    # Documented: Reference(adata, cell_type_col=...), run_rctd(spatial, reference, mode=...).
    # 'full' mode = weights for all K types per spot, the documented choice for Visium-like
    # multi-cell spots.  RCTDConfig defaults (R spacexr create.RCTD defaults) except
    # device='cpu' and compile: torch.compile is only a speed-up, costs 10-20 min of
    # kernel compilation on first use, so it is off unless RCTD_COMPILE=1.
    config = rctd.RCTDConfig(device="cpu", compile=compile_)
    # Reference drops types with fewer than cell_min (default 25, spacexr's CELL_MIN_INSTANCE)
    # cells; $RCTD_CELL_MIN lowers it so that every type of the reference is kept.
    cell_min = os.environ.get("RCTD_CELL_MIN")
    ref_kw = {"cell_min": int(cell_min)} if cell_min else {}
    reference = rctd.Reference(ref, cell_type_col=key, **ref_kw)
    res = rctd.run_rctd(slide, reference, mode="full", config=config)
    w = np.asarray(res.weights, dtype=np.float64)
    names = list(res.cell_type_names)
    mask = np.ones(slide.n_obs, bool) if res.pixel_mask is None else np.asarray(res.pixel_mask)
    full = np.full((slide.n_obs, len(names)), np.nan)
    full[mask] = w
    props = pd.DataFrame(full, index=slide.obs_names, columns=names)
    params = {
        "mode": "full",
        **{
            k: v
            for k, v in config._asdict().items()
            if isinstance(v, (int, float, str, bool, type(None)))
        },
        "q_matrices": qpath,
        "q_matrices_source": "computed locally by benchmarks/peers/rctd_qmat.py",
        "reference_cell_min": int(cell_min) if cell_min else "package default (25)",
    }
    info = {
        "quantity": "mRNA fraction: full-mode RCTD weights (reference profiles normalised "
        "per UMI), normalised to sum 1 as spacexr normalize_weights",
        "n_spots_filtered_by_rctd": int((~mask).sum()),
        "n_not_converged": int((~np.asarray(res.converged)).sum()),
    }
    return props, params, info


def run_cell2location(slide, ref, key, a):
    import cell2location
    import pandas as pd
    import scvi
    from cell2location.models import Cell2location, RegressionModel

    scvi.settings.seed = a.seed
    slide, ref = _common_genes(slide, ref)
    # cell2location tutorial: filter_genes on the reference (cell_count_cutoff=5,
    # cell_percentage_cutoff2=0.03, nonz_mean_cutoff=1.12) then regression model.
    from cell2location.utils.filtering import filter_genes

    keep = filter_genes(
        ref, cell_count_cutoff=5, cell_percentage_cutoff2=0.03, nonz_mean_cutoff=1.12
    )
    import matplotlib.pyplot as plt

    plt.close("all")
    ref = ref[:, keep].copy()
    ref_epochs = a.ref_epochs if a.ref_epochs is not None else 250
    RegressionModel.setup_anndata(adata=ref, labels_key=key)
    rm = RegressionModel(ref)
    rm.train(max_epochs=ref_epochs, accelerator="cpu")
    ref = rm.export_posterior(
        ref, sample_kwargs={"num_samples": 1000, "batch_size": 2500, "accelerator": "cpu"}
    )
    names = list(ref.uns["mod"]["factor_names"])
    if "means_per_cluster_mu_fg" in ref.varm:
        inf_aver = ref.varm["means_per_cluster_mu_fg"][
            [f"means_per_cluster_mu_fg_{i}" for i in names]
        ].copy()
    else:
        inf_aver = ref.var[[f"means_per_cluster_mu_fg_{i}" for i in names]].copy()
    inf_aver.columns = names
    genes = [g for g in slide.var_names if g in set(inf_aver.index)]
    slide = slide[:, genes].copy()
    inf_aver = inf_aver.loc[genes, :].copy()

    n_cells = a.cells_per_spot if a.cells_per_spot is not None else 8.0  # module default
    Cell2location.setup_anndata(adata=slide)
    m = Cell2location(
        slide, cell_state_df=inf_aver, N_cells_per_location=n_cells, detection_alpha=20
    )
    epochs = a.epochs if a.epochs is not None else DEFAULT_EPOCHS["cell2location"]
    m.train(max_epochs=epochs, batch_size=None, train_size=1, accelerator="cpu")
    slide = m.export_posterior(
        slide,
        sample_kwargs={"num_samples": 1000, "batch_size": m.adata.n_obs, "accelerator": "cpu"},
    )
    ab = slide.obsm["means_cell_abundance_w_sf"].copy()
    ab.columns = [c.replace("meanscell_abundance_w_sf_", "") for c in ab.columns]
    props = pd.DataFrame(ab.values, index=slide.obs_names, columns=list(ab.columns))
    params = {
        "reference_model": "RegressionModel",
        "reference_epochs": ref_epochs,
        "reference_filter_genes": {
            "cell_count_cutoff": 5,
            "cell_percentage_cutoff2": 0.03,
            "nonz_mean_cutoff": 1.12,
        },
        "n_genes_used": len(genes),
        "spatial_model": "Cell2location",
        "spatial_epochs": epochs,
        "spatial_epochs_documented": 30000,
        "N_cells_per_location": n_cells,
        "detection_alpha": 20,
        "posterior_samples": 1000,
        "lr": 0.002,
        "estimate": "posterior mean cell abundance (means_cell_abundance_w_sf)",
    }
    info = {
        "quantity": "cell fraction: posterior mean absolute cell abundance normalised per spot",
        "cell2location_version": cell2location.__version__
        if hasattr(cell2location, "__version__")
        else _version("cell2location"),
        "final_elbo": float(m.history["elbo_train"].values[-1, 0]),
    }
    return props, params, info


def run_stereoscope(slide, ref, key, a):
    import scvi
    from scvi.external import RNAStereoscope, SpatialStereoscope

    scvi.settings.seed = a.seed
    slide, ref = _common_genes(slide, ref)
    sc_epochs = a.ref_epochs if a.ref_epochs is not None else 400  # RNAStereoscope default
    # SpatialStereoscope.train default is 400 epochs of minibatches of 128 spots: on a
    # small slide (300 spots = 3 steps/epoch) that is ~1200 Adam steps and the loss is far
    # from converged (smoke slide: RMSE 0.27 = no better than the global mean; 0.09 at
    # 4000 epochs, loss still falling).  Default here: at least 400 epochs and ~30000
    # gradient steps, i.e. max(400, ceil(30000 / ceil(n_spots / 128))) epochs.
    n_batches = int(np.ceil(slide.n_obs / 128))
    st_epochs = a.epochs if a.epochs is not None else max(400, int(np.ceil(30000 / n_batches)))
    RNAStereoscope.setup_anndata(ref, labels_key=key)
    scm = RNAStereoscope(ref)
    scm.train(max_epochs=sc_epochs, accelerator="cpu")
    SpatialStereoscope.setup_anndata(slide)
    stm = SpatialStereoscope.from_rna_model(slide, scm)
    stm.train(max_epochs=st_epochs, accelerator="cpu")
    props = stm.get_proportions()
    params = {
        "sc_model": "RNAStereoscope",
        "sc_epochs": sc_epochs,
        "spatial_model": "SpatialStereoscope",
        "spatial_epochs": st_epochs,
        "lr": 0.01,
        "n_genes_used": slide.n_vars,
        "spatial_epochs_package_default": 400,
        "spatial_batch_size": 128,
        "note": "sc epochs = package default; spatial epochs raised to ~30000 steps "
        "(package default 400 does not converge on small slides)",
    }
    info = {
        "quantity": "mRNA fraction: normalised loadings of per-UMI cell-type rates "
        "(noise term dropped)"
    }
    return props, params, info


def run_destvi(slide, ref, key, a):
    import scvi
    from scvi.model import CondSCVI, DestVI

    scvi.settings.seed = a.seed
    slide, ref = _common_genes(slide, ref)
    sc_epochs = a.ref_epochs if a.ref_epochs is not None else 300  # CondSCVI default
    st_epochs = a.epochs if a.epochs is not None else 2000  # DestVI default
    try:
        CondSCVI.setup_anndata(ref, labels_key=key)
        # prior="normal" is CondSCVI's default; passing it explicitly works around
        # scvi-tools 1.4.2 DestVI.from_rna_model reading module_kwargs["prior"]
        # (KeyError: 'prior' when the default is used).
        scm = CondSCVI(ref, weight_obs=False, prior="normal")
        scm.train(max_epochs=sc_epochs, accelerator="cpu")
        # scvi-tools 1.4.2: CondSCVI.get_vamp_prior returns numpy arrays for the default
        # (normal) prior but DestVI's module registers them as torch buffers -> TypeError.
        # Convert them to float32 tensors (same values, same model).
        import torch

        _orig_vamp = scm.get_vamp_prior

        def _vamp_as_tensors(*args, **kwargs):
            out = _orig_vamp(*args, **kwargs)
            return {
                k: (torch.as_tensor(v, dtype=torch.float32) if isinstance(v, np.ndarray) else v)
                for k, v in out.items()
            }

        scm.get_vamp_prior = _vamp_as_tensors
        DestVI.setup_anndata(slide)
        stm = DestVI.from_rna_model(slide, scm)
        stm.train(max_epochs=st_epochs, accelerator="cpu")
        props = stm.get_proportions()
    except Exception as e:  # known breakage in scvi-tools 1.4.2 DestVI
        traceback.print_exc()
        last = traceback.extract_tb(e.__traceback__)[-1]
        raise PeerUnavailable(
            f"DestVI failed in scvi-tools {_version('scvi-tools')}: {type(e).__name__}: {e} "
            f"(at {os.path.basename(last.filename)}:{last.lineno})"
        ) from e
    if props is None:
        raise PeerUnavailable(
            f"DestVI.get_proportions() returned None in scvi-tools {_version('scvi-tools')} "
            "(the method computes the proportions but never returns them)"
        )
    params = {
        "sc_model": "CondSCVI(weight_obs=False, prior='normal')",
        "sc_epochs": sc_epochs,
        "workaround": "prior='normal' (the default) passed explicitly: scvi-tools 1.4.2 "
        "DestVI.from_rna_model raises KeyError 'prior' otherwise; "
        "CondSCVI.get_vamp_prior output converted numpy->torch (TypeError "
        "registering buffer 'mean_vprior' otherwise)",
        "spatial_model": "DestVI.from_rna_model",
        "spatial_epochs": st_epochs,
        "n_genes_used": slide.n_vars,
    }
    info = {"quantity": "mRNA fraction: normalised DestVI proportions (additional types dropped)"}
    return props, params, info


def run_tangram(slide, ref, key, a):
    import pandas as pd
    import scanpy as sc
    import tangram as tg

    slide, ref = _common_genes(slide, ref)
    # Tangram tutorial: log-normalised scRNA-seq, training genes = top-100 markers per
    # cell type from sc.tl.rank_genes_groups; mode="cells",
    # density_prior="rna_count_based"; then project_cell_annotations.
    for ad in (ref, slide):
        sc.pp.normalize_total(ad)
        sc.pp.log1p(ad)
    ref.obs[key] = ref.obs[key].astype("category")
    sc.tl.rank_genes_groups(ref, groupby=key, use_raw=False)
    markers_df = pd.DataFrame(ref.uns["rank_genes_groups"]["names"]).iloc[0:100, :]
    markers = list(np.unique(markers_df.melt().value.values))
    tg.pp_adatas(ref, slide, genes=markers)
    epochs = a.epochs if a.epochs is not None else 1000
    ad_map = tg.map_cells_to_space(
        ref,
        slide,
        mode="cells",
        density_prior="rna_count_based",
        num_epochs=epochs,
        device="cpu",
        random_state=a.seed,
        verbose=False,
    )
    tg.project_cell_annotations(ad_map, slide, annotation=key)
    ct = slide.obsm["tangram_ct_pred"]
    props = pd.DataFrame(
        np.asarray(ct, dtype=np.float64),
        index=slide.obs_names,
        columns=[str(c) for c in ct.columns],
    )
    params = {
        "mode": "cells",
        "density_prior": "rna_count_based",
        "num_epochs": epochs,
        "learning_rate": 0.1,
        "lambda_d": 1,
        "lambda_g1": 1,
        "lambda_g2": 0,
        "lambda_r": 0,
        "preprocessing": "normalize_total + log1p (sc and spatial)",
        "training_genes": f"top-100 rank_genes_groups markers per type ({len(markers)})",
        "n_training_genes": len(slide.uns["training_genes"]),
    }
    info = {
        "quantity": "cell fraction: expected number of mapped cells per type "
        "(project_cell_annotations) normalised per spot"
    }
    return props, params, info


RUNNERS = {
    "flashdeconv": run_flashdeconv,
    "rctd": run_rctd,
    "cell2location": run_cell2location,
    "stereoscope": run_stereoscope,
    "destvi": run_destvi,
    "tangram": run_tangram,
}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--method", required=True, choices=sorted(RUNNERS))
    ap.add_argument("--slide", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--cell-type-key", default="cell_type")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs of the spatial model (SGD methods); "
        "default = the method's documented default (cell2location: 10000)",
    )
    ap.add_argument(
        "--ref-epochs",
        type=int,
        default=None,
        help="epochs of the reference model (cell2location/stereoscope/destvi)",
    )
    ap.add_argument(
        "--cells-per-spot",
        type=float,
        default=None,
        help="cell2location N_cells_per_location (default: package default 8)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for BLAS/OpenMP/torch/numba (default 1 or $PEER_THREADS)",
    )
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    sidecar = {
        "method": a.method,
        "package": METHOD_PACKAGE[a.method],
        "package_version": _version(METHOD_PACKAGE[a.method]),
        "venv": sys.prefix,
        "python": platform.python_version(),
        "torch_version": _version("torch"),
        "seed": a.seed,
        "threads": N_THREADS,
        "slide": os.path.abspath(a.slide),
        "reference": os.path.abspath(a.reference),
        "cell_type_key": a.cell_type_key,
    }
    side_path = a.out + ".json"

    def write_sidecar(status, **kw):
        sidecar.update(status=status, wall_time_s=round(time.perf_counter() - t0, 3), **_rss_mb())
        sidecar.update(kw)
        with open(side_path, "w") as f:
            json.dump(sidecar, f, indent=2, default=str)

    try:
        import anndata
        import pandas as pd

        slide = anndata.read_h5ad(a.slide)
        ref = anndata.read_h5ad(a.reference)
        if "spatial" not in slide.obsm:
            raise SystemExit("run_peer: slide.obsm['spatial'] missing")
        if a.cell_type_key not in ref.obs:
            raise SystemExit(f"run_peer: reference.obs[{a.cell_type_key!r}] missing")
        slide = _as_counts(slide, "slide")
        ref = _as_counts(ref, "reference")
        ref.obs[a.cell_type_key] = ref.obs[a.cell_type_key].astype(str).astype("category")
        types = sorted(ref.obs[a.cell_type_key].cat.categories)
        spots = list(slide.obs_names)
        sidecar.update(
            n_spots=slide.n_obs,
            n_genes_slide=slide.n_vars,
            n_cells_ref=ref.n_obs,
            n_cell_types=len(types),
        )
        _seed_everything(a.seed)
        t_fit = time.perf_counter()
        props, params, info = RUNNERS[a.method](slide, ref, a.cell_type_key, a)
        fit_s = time.perf_counter() - t_fit

        if a.method in ("flashdeconv", "rctd") and (a.epochs or a.ref_epochs):
            params = {**params, "epochs_ignored": "not an SGD method; --epochs has no effect"}
        props = pd.DataFrame(props).copy()
        props.columns = [str(c) for c in props.columns]
        props = props.reindex(index=spots, columns=types)
        missing = [t for t in types if props[t].isna().all()]
        vals = props.to_numpy(dtype=np.float64)
        vals = np.clip(np.nan_to_num(vals, nan=np.nan), 0, None)
        rs = np.nansum(vals, axis=1, keepdims=True)
        bad = ~np.isfinite(rs[:, 0]) | (rs[:, 0] <= 0) | np.isnan(vals).all(axis=1)
        vals = np.where(np.isnan(vals), 0.0, vals)
        vals = np.divide(vals, rs, out=np.full_like(vals, 1.0 / len(types)), where=~bad[:, None])
        vals[bad] = 1.0 / len(types)  # no estimate for this spot -> uniform (counted below)
        out = pd.DataFrame(vals, index=spots, columns=types)
        out.index.name = "spot"
        out.to_csv(a.out)
        write_sidecar(
            "ok",
            fit_time_s=round(fit_s, 3),
            parameters=params,
            n_spots_without_estimate_set_uniform=int(bad.sum()),
            cell_types_missing_from_output=missing,
            **info,
        )
        print(f"run_peer: {a.method} ok in {sidecar['wall_time_s']:.1f}s -> {a.out}")
        return 0
    except PeerUnavailable as e:
        msg = str(e).replace("\n", " ")
        write_sidecar("unavailable", reason=msg)
        print(f"run_peer: {a.method} unavailable: {msg}", file=sys.stderr)
        return 3
    except SystemExit as e:
        if isinstance(e.code, str):
            write_sidecar("bad_input", reason=e.code)
            print(e.code, file=sys.stderr)
            return 2
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a peer's code is recorded, not raised
        traceback.print_exc()
        write_sidecar("error", reason=f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
