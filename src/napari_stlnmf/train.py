"""Training the unrolled network on slides simulated on the user's own layout.

Slides are crops of the user's spot layout (with its image features), with proportions
and counts simulated from the reference; train and validation slides are disjoint
simulations, and the user's real counts are never used as a target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

from .calibration import SlideNoise
from .graph import SpatialGraph
from .model import EntryNoise, UnrolledNMF, graph_tensors
from .preprocess import Reference, normalise_counts
from .progress import Cancelled
from .simulate import simulate_slide

__all__ = [
    "TrainReport",
    "TrainingSlide",
    "calibrated_noise_ranges",
    "make_training_slides",
    "stack_slides",
    "train_unrolled",
]


HEAD_PARAMETERS = ("log_cell_smoothing", "raw_cell_sigma")
# the kinds the shipped parameters were trained on (simulate.KINDS also has 'near_pure', a
# held-out kind for benchmarks: adding it here would change every trained model)
TRAINING_KINDS = ("smooth", "regions", "gradient")


@dataclass
class TrainingSlide:
    X: torch.Tensor  # spots x genes, rows sum to one
    truth: torch.Tensor  # spots x types, cell fractions
    graph: dict | None
    kind: str
    library_size: torch.Tensor | None = None  # counts per spot (per-entry weights need them)


@dataclass
class TrainReport:
    val_rmse_initial: float
    val_rmse: float
    train_rmse: float
    epochs: int
    best_epoch: int
    seconds: float
    history: list = field(default_factory=list)
    noise: SlideNoise | None = None  # what the training slides' noise was calibrated on

    def as_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in (
                "val_rmse_initial",
                "val_rmse",
                "train_rmse",
                "epochs",
                "best_epoch",
                "seconds",
            )
        }
        if self.noise is not None:
            out["noise"] = {
                "platform_sigma": float(self.noise.platform_sigma),
                "overdispersion": float(self.noise.overdispersion),
            }
        return out


def make_training_slides(
    coords: np.ndarray,
    graph: SpatialGraph,
    reference: Reference,
    *,
    n_slides: int = 10,
    max_spots: int = 1500,
    features: np.ndarray | None = None,
    library_sizes: np.ndarray | None = None,
    platform_sigma: tuple[float, float] = (0.0, 0.4),
    mean_cells: tuple[float, float] = (3.0, 15.0),
    gamma_shape: tuple[float, float] = (5.0, 5.0),
    seed: int = 0,
    device=None,
) -> list[TrainingSlide]:
    """Simulate ``n_slides`` training slides on crops of the user's layout.

    ``reference`` must already be restricted to the model's genes. Kinds of slides cycle
    through smooth mixtures, near one-hot regions and gradients; platform effect and cells
    per spot vary between slides so the learned parameters do not fit one noise level.
    """
    rng = np.random.default_rng(seed)
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    n = len(xy)
    tree = cKDTree(xy)
    slides = []
    for i in range(n_slides):
        if n > max_spots:
            centre = xy[rng.integers(n)]
            _, idx = tree.query(centre, k=max_spots)
            idx = np.sort(idx)
        else:
            idx = np.arange(n)
        sub = graph.subgraph(idx)
        feats = None if features is None else features[idx]
        shape = 5.0  # NB noise of signature-only simulations (single cells bring their own)
        if reference.cell_counts is None:
            shape = float(np.exp(rng.uniform(np.log(gamma_shape[0]), np.log(gamma_shape[1]))))
        sim = simulate_slide(
            xy[idx],
            reference,
            kind=TRAINING_KINDS[i % len(TRAINING_KINDS)],
            features=feats,
            library_sizes=library_sizes,
            spacing=graph.spacing,
            mean_cells=float(rng.uniform(*mean_cells)),
            platform_sigma=float(rng.uniform(*platform_sigma)),
            gamma_shape=shape,
            seed=int(rng.integers(2**31)),
        )
        X, lib = normalise_counts(sim.counts)
        ok = lib > 0
        if not ok.all():
            keep = np.flatnonzero(ok)
            X, truth, sub = X[keep], sim.cell_fractions[keep], sub.subgraph(keep)
        else:
            truth = sim.cell_fractions
        slides.append(
            TrainingSlide(
                X=torch.as_tensor(X, device=device),
                truth=torch.as_tensor(truth, dtype=torch.float32, device=device),
                graph=graph_tensors(sub, device=device),
                kind=sim.kind,
                library_size=torch.as_tensor(lib[ok], dtype=torch.float32, device=device),
            )
        )
    return slides


def stack_slides(slides: list[TrainingSlide]) -> TrainingSlide:
    """One block-diagonal problem from several slides: one forward pass per epoch."""
    X = torch.cat([s.X for s in slides])
    truth = torch.cat([s.truth for s in slides])
    parts, offset = [], 0
    for s in slides:
        if s.graph is not None:
            parts.append((s.graph, offset))
        offset += s.X.shape[0]
    graph = None
    if parts:
        cat = lambda key: torch.cat(
            [g[key] + (o if key in ("rows", "cols") else 0) for g, o in parts]
        )
        has_feat = all(g["feature_distance"] is not None for g, _ in parts)
        graph = {
            "rows": cat("rows"),
            "cols": cat("cols"),
            "distance": cat("distance"),
            "feature_distance": cat("feature_distance") if has_feat else None,
            "n_spots": offset,
        }
    return TrainingSlide(X, truth, graph, "stack", torch.cat([s.library_size for s in slides]))


def _noise(model, batch: TrainingSlide, overdispersion: float, compact_gram: bool = False):
    if not model.entry_weights:
        return None
    return EntryNoise(batch.library_size, overdispersion, compact_gram=compact_gram)


def _rmse(model, batch, B, scale, content, overdispersion=0.0, compact_gram=False) -> float:
    with torch.no_grad():
        noise = _noise(model, batch, overdispersion, compact_gram)
        V = model(batch.X, B, scale, batch.graph, noise=noise)
        return float(
            torch.sqrt(((model.cell_fractions(V, content, batch.graph) - batch.truth) ** 2).mean())
        )


def train_unrolled(
    model: UnrolledNMF,
    B: np.ndarray,
    gene_weights: np.ndarray,
    mrna_content: np.ndarray,
    train_slides: list[TrainingSlide],
    val_slides: list[TrainingSlide],
    *,
    epochs: int = 60,
    lr: float = 0.1,
    patience: int = 15,
    min_delta: float = 1e-3,
    gene_weight_penalty: float = 1e-3,
    min_improvement: float = 0.05,
    overdispersion: float = 0.0,
    compact_gram: bool = False,
    progress=None,
    should_stop=None,
    seed: int = 0,
) -> TrainReport:
    """Adam on the RMSE of cell fractions, back-propagated through all layers.

    Keeps the parameters of the epoch with the best validation RMSE (early stopping: after
    ``patience`` epochs without a gain above the relative ``min_delta``; creeping by less, as
    from parameters already tuned, would otherwise run every epoch).
    Guard: unless that beats the initial parameters' validation RMSE by more than the
    relative margin ``min_improvement``, the initial parameters are kept (a gain within
    the noise of the validation estimate is not worth the risk of a simulator mismatch).
    ``overdispersion``: the slide's φ, for a model with per-entry weights; ``compact_gram``:
    keep their per-spot Gram matrices as bfloat16 upper triangles (see :class:`EntryNoise`).
    ``progress(stage, i, n)`` and ``should_stop()`` are optional callbacks.
    """
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    dev = train_slides[0].X.device
    Bt = torch.as_tensor(B, device=dev)
    st = torch.as_tensor(gene_weights, device=dev)
    ct = torch.as_tensor(mrna_content, dtype=torch.float32, device=dev)
    train_batch, val_batch = stack_slides(train_slides), stack_slides(val_slides)
    # the cell-fraction head is learned with the shipped parameters on the zeroed output users get
    # (benchmarks/train_defaults.py --head-only); fine-tuning's loss is on unzeroed fractions
    params = [
        p for name, p in model.named_parameters() if p.requires_grad and name not in HEAD_PARAMETERS
    ]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(epochs // 3, 1), gamma=0.5)
    noise_kw = {"overdispersion": overdispersion, "compact_gram": compact_gram}
    best = _rmse(model, val_batch, Bt, st, ct, **noise_kw)
    initial = best
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial_state = best_state
    best_epoch, since_best, history = 0, 0, []
    train_rmse = float("nan")
    for epoch in range(1, epochs + 1):
        if should_stop is not None and should_stop():
            raise Cancelled("training cancelled")
        opt.zero_grad()
        V = model(
            train_batch.X,
            Bt,
            st,
            train_batch.graph,
            noise=_noise(model, train_batch, **noise_kw),
        )
        mse = ((model.cell_fractions(V, ct, train_batch.graph) - train_batch.truth) ** 2).mean()
        loss = mse + gene_weight_penalty * (model.log_gene_weight**2).mean()
        loss.backward()
        opt.step()
        sched.step()
        train_rmse = float(mse.detach().sqrt())
        val = _rmse(model, val_batch, Bt, st, ct, **noise_kw)
        history.append((epoch, train_rmse, val))
        since_best = 0 if val < best * (1.0 - min_delta) else since_best + 1
        if val < best - 1e-6:
            best, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress is not None:
            progress("training", epoch, epochs)
        if since_best >= patience:
            break
    if best > initial * (1.0 - min_improvement):
        best_state, best, best_epoch = initial_state, initial, 0
    model.load_state_dict(best_state)
    return TrainReport(
        initial, best, train_rmse, len(history), best_epoch, time.perf_counter() - t0, history
    )


def calibrated_noise_ranges(noise: SlideNoise, *, signature_only: bool) -> dict:
    """Simulation noise ranges for training, bracketing what the slide's noise measured.

    The platform effect is drawn around the measured one (never far above it: parameters
    trained to undo a platform effect the slide does not have hurt on clean slides); for
    signature-only references the extra-Poisson noise (gamma shape) is bracketed the same way.
    """
    s = float(noise.platform_sigma)
    out = {"platform_sigma": (0.5 * s, min(1.5 * s + 0.02, 0.6))}
    if signature_only:
        d = noise.gamma_shape
        d = min(max(d, 2.0), 1e4) if np.isfinite(d) else 1e4
        out["gamma_shape"] = (max(0.5 * d, 2.0), min(2.0 * d, 2e4))
    return out
