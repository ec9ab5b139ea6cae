"""STL NMF's unrolled network: K update layers with learned hyper-parameters, the cell-fraction
head, and their parameter files. The update itself (method.md) is in :mod:`.updates`; both
solvers behind one interface in :mod:`.solvers`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FileFormatError, StlnmfError
from .graph import SpatialGraph
from .updates import (
    EPS,
    GRAM_CHUNK,
    MU_FLOOR,
    UNPACK_CHUNK,
    EntryNoise,
    EntryWeights,
    LearnedGraph,
    Penalties,
    SharedGram,
    edge_weights,
    entry_weighted_gram,
    flush_denormals,
    gram_bytes,
    gram_times,
    graph_tensors,
    inference_graph,
    normal_equations,
    objective,
    run_layers,
    solve,
    uniform_start,
)

__all__ = [
    "DEFAULTS",
    "EPS",
    "GRAM_CHUNK",
    "MU_FLOOR",
    "REFRESH_LAYERS",
    "UNPACK_CHUNK",
    "EntryNoise",
    "UnrolledNMF",
    "edge_weights",
    "entry_weighted_gram",
    "finalize_proportions",
    "flush_denormals",
    "gram_bytes",
    "gram_times",
    "graph_tensors",
    "objective",
    "pick_device",
    "solve",
    "to_cell_fractions",
]

REFRESH_LAYERS = (0, 15, 40)  # layers at which per-entry weights are recomputed
SIGMA_RANGE = (0.25, 8.0)  # σ's in spot spacings / standardised feature units
OMEGA_RANGE = (0.5, 2.0)  # over-relaxation exponent of the multiplicative update


CELL_SMOOTHING_STEPS = 3  # Jacobi steps of the cell-fraction head
MIN_OVER_RELAXATION = 0.05  # ω - 1 below this is damped to the plain update at once
CELL_SMOOTHING_MAX = 4.0
NO_CELL_SMOOTHING = 1e-8


@dataclass(frozen=True)
class Defaults:
    lambda_graph: float = 0.05
    lambda_sum: float = 0.1
    lambda_ridge: float = 1e-3
    sigma_distance: float = 1.0
    sigma_feature: float = 1.0
    n_layers: int = 100
    omega: float = 1.0  # over-relaxation exponent of the update (plain MU), in OMEGA_RANGE
    omega_start: float = 1.5  # what deconvolve() starts a fresh unrolled model from
    # the cell-fraction head (UnrolledNMF.cell_fractions) as learned with the shipped layers
    cell_smoothing: float = 0.19  # α
    cell_sigma: float = 0.73  # its distance scale (spot spacings)


DEFAULTS = Defaults()

_DEVICE_HINT = "use device='auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:<index>'"


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device named by ``device`` ('auto': CUDA when available, else the CPU),
    checked to exist here: an unknown name or a missing GPU raises :class:`StlnmfError`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StlnmfError(f"unknown device {device!r}: {_DEVICE_HINT}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StlnmfError(
                f"device {device!r} asked for, but this PyTorch build sees no CUDA GPU "
                "(a CPU-only build, or no driver): use device='cpu' or 'auto', or install a "
                "CUDA build of PyTorch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StlnmfError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA "
                f"GPU(s) are visible: {_DEVICE_HINT}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise StlnmfError(f"device {device!r} (Apple GPU) is not available: {_DEVICE_HINT}")
    elif dev.type != "cpu":
        raise StlnmfError(f"device {device!r} is not supported: {_DEVICE_HINT}")
    return dev


def to_cell_fractions(V, mrna_content):
    """mRNA fractions -> cell fractions: divide by each type's mRNA per cell, renormalise."""
    if isinstance(V, torch.Tensor):
        c = torch.as_tensor(mrna_content, dtype=V.dtype, device=V.device)
        cf = V / c
        return cf / cf.sum(1, keepdim=True).clamp_min(EPS)
    cf = np.asarray(V) / np.asarray(mrna_content)[None, :]
    return cf / np.maximum(cf.sum(1, keepdims=True), EPS)


def finalize_proportions(V: np.ndarray, min_proportion: float = 0.0) -> np.ndarray:
    """Rows sum to one; proportions below ``min_proportion`` zeroed (the largest is kept)."""
    V = np.maximum(np.asarray(V, dtype=np.float64), 0)
    V = V / np.maximum(V.sum(1, keepdims=True), EPS)
    if min_proportion > 0:
        keep = V >= min_proportion
        keep[np.arange(len(V)), V.argmax(1)] = True
        V = np.where(keep, V, 0.0)
        V = V / np.maximum(V.sum(1, keepdims=True), EPS)
    return V


def _bounded(V: torch.Tensor, max_row_sum: float = 10.0) -> bool:
    """Finite, and no spot's total far from the ~1 the sum-to-one penalty keeps it near."""
    return bool(torch.isfinite(V).all()) and float(V.sum(1).max()) < max_row_sum


def _inv_sigmoid_range(x, lo, hi):
    t = (x - lo) / (hi - lo)
    return math.log(t / (1 - t))


class UnrolledNMF(nn.Module):
    """K multiplicative-update layers whose hyper-parameters are learned.

    Learned (all kept positive): λ1 (graph), λ2 (sum-to-one), λ3 (ridge) — one set shared
    by all layers (``tied=True``, as the original) or one per layer; σ_distance and
    σ_feature (bounded to :data:`SIGMA_RANGE`, gradients flow through the graph weights);
    per-type ridge weights w3; and one weight per gene (the lever that measured best).
    """

    def __init__(
        self,
        n_genes: int,
        n_types: int,
        *,
        n_layers: int = DEFAULTS.n_layers,
        tied: bool = True,
        lambda_graph: float = DEFAULTS.lambda_graph,
        lambda_sum: float = DEFAULTS.lambda_sum,
        lambda_ridge: float = DEFAULTS.lambda_ridge,
        sigma_distance: float = DEFAULTS.sigma_distance,
        sigma_feature: float = DEFAULTS.sigma_feature,
        learn_gene_weights: bool = True,
        omega: float = DEFAULTS.omega,
        cell_smoothing: float = DEFAULTS.cell_smoothing,
    ):
        super().__init__()
        self.n_layers = int(n_layers)
        self.tied = bool(tied)
        rows = 1 if tied else self.n_layers
        init = torch.log(
            torch.tensor([lambda_graph, lambda_sum, lambda_ridge], dtype=torch.float32)
        )
        self.log_lambda = nn.Parameter(init.repeat(rows, 1))
        lo, hi = SIGMA_RANGE
        self.raw_sigma = nn.Parameter(
            torch.tensor(
                [
                    _inv_sigmoid_range(sigma_distance, lo, hi),
                    _inv_sigmoid_range(sigma_feature, lo, hi),
                ],
                dtype=torch.float32,
            )
        )
        self.log_type_weight = nn.Parameter(torch.zeros(n_types))
        self.log_gene_weight = nn.Parameter(torch.zeros(n_genes), requires_grad=learn_gene_weights)
        self.raw_omega = nn.Parameter(
            torch.tensor(_inv_sigmoid_range(omega, *OMEGA_RANGE), dtype=torch.float32)
        )
        self.log_cell_smoothing = nn.Parameter(
            torch.tensor(float(np.log(max(cell_smoothing, NO_CELL_SMOOTHING))))
        )
        # the head's own distance scale: the layers' σ can be short (their graph term acts in
        # every layer)
        self.raw_cell_sigma = nn.Parameter(
            torch.tensor(_inv_sigmoid_range(DEFAULTS.cell_sigma, lo, hi), dtype=torch.float32)
        )
        # layers at which per-entry weights are recomputed; None: one weight per gene
        self.refresh_layers: tuple[int, ...] | None = None
        # inference: ω to start from instead of the learned one (None), and the ω the last
        # inference ended with (after any damping)
        self.fixed_omega: float | None = None
        self.last_omega: float | None = None

    def cell_smoothing(self) -> torch.Tensor:
        return torch.exp(self.log_cell_smoothing.clamp(max=np.log(CELL_SMOOTHING_MAX)))

    def cell_sigma(self) -> torch.Tensor:
        lo, hi = SIGMA_RANGE
        return lo + (hi - lo) * torch.sigmoid(self.raw_cell_sigma)

    def cell_fractions(self, V, mrna_content, graph) -> torch.Tensor | np.ndarray:
        """Cell fractions from mRNA fractions ``V``, smoothed over the graph.

        Spots draw cells of random size, so a spot's mRNA shares are its cell shares distorted
        by those sizes: real for mRNA fractions, noise for cell fractions. ``CELL_SMOOTHING_STEPS``
        steps of ``c = (c0 + α A c) / (1 + α A1)`` (A the graph with the head's σ) average it
        out over neighbours, and the zeroing that follows decides with them which small
        proportions are real. α and the head's σ are learned on the zeroed cell fractions with
        the layers frozen (``benchmarks/train_defaults.py --head-only``), so the layers keep the
        λ's that suit mRNA fractions. ``graph``: the training path's tensors (see
        :func:`graph_tensors`) for a tensor ``V``, a :class:`SpatialGraph` for an array, or None.
        """
        c0 = to_cell_fractions(V, mrna_content)
        if graph is None:
            return c0
        alpha = self.cell_smoothing()
        sigma_feature = self.sigmas()[1]
        if isinstance(V, torch.Tensor):
            A = LearnedGraph(graph, self.cell_sigma(), sigma_feature)
            c = c0
            for _ in range(CELL_SMOOTHING_STEPS):
                c = (c0 + alpha * A.product(c)) / (1 + alpha * A.degree)
            return c
        if graph.n_edges == 0:
            return c0
        alpha = float(alpha.detach())
        A = graph.adjacency(float(self.cell_sigma().detach()), float(sigma_feature.detach()))
        scale = 1.0 / (1.0 + alpha * np.asarray(A.sum(1)).ravel())[:, None]
        c = c0
        for _ in range(CELL_SMOOTHING_STEPS):
            c = (c0 + alpha * (A @ c)) * scale
        return c

    def omega(self) -> torch.Tensor:
        lo, hi = OMEGA_RANGE
        return lo + (hi - lo) * torch.sigmoid(self.raw_omega)

    # parameters in their natural units
    def lambdas(self) -> torch.Tensor:
        """(rows, 3) tensor of λ1, λ2, λ3 (rows = 1 if tied else n_layers)."""
        return torch.exp(self.log_lambda)

    def sigmas(self) -> torch.Tensor:
        lo, hi = SIGMA_RANGE
        return lo + (hi - lo) * torch.sigmoid(self.raw_sigma)

    def learned_gene_weights(self) -> torch.Tensor:
        return torch.exp(self.log_gene_weight.clamp(-3.0, 3.0))

    def ridge(self) -> torch.Tensor:
        """(rows, n_types): 2 λ3 w3² per layer row."""
        return 2 * self.lambdas()[:, 2:3] * torch.exp(2 * self.log_type_weight)[None, :]

    def gram(self, X, B: torch.Tensor, gene_weights: torch.Tensor):
        """``BtX`` (spots x types) and ``BtB`` with the (learned) gene weights applied.

        ``X`` is a dense tensor or a scipy sparse matrix (large slides stay sparse).
        """
        return normal_equations(X, B, (gene_weights * self.learned_gene_weights()) ** 2)

    @property
    def entry_weights(self) -> bool:
        """Whether the data term uses per-entry (spot x gene) weights instead of gene weights."""
        return self.refresh_layers is not None

    def _data_term(self, X, B, gene_weights, noise, gram=None):
        """The data term and the uniform start V: per-entry weights (from ``noise``) or one Gram
        matrix (``gram``, else formed from ``X``)."""
        if not self.entry_weights:
            data = SharedGram(*(gram if gram is not None else self.gram(X, B, gene_weights)))
            return data, uniform_start(*data.BtX.shape, data.BtX)
        if noise is None:
            raise ValueError(
                "this model uses per-entry weights: "
                "pass noise=EntryNoise(library sizes, overdispersion)"
            )
        dtype = X.dtype if isinstance(X, torch.Tensor) else torch.float32
        start = uniform_start(X.shape[0], B.shape[1], B, dtype)
        return EntryWeights(X, B, noise, tuple(self.refresh_layers)), start

    def _penalties(self, *, as_numbers: bool, device=None, dtype=None) -> Penalties:
        """The layers' λ's and ridges: tensors (differentiable) or numbers (inference)."""
        lam, ridge = self.lambdas(), self.ridge()
        if as_numbers:
            lam = lam.detach().cpu().numpy().astype(np.float64)
            ridge = ridge.detach().to(device=device, dtype=dtype)
        if self.tied:
            return Penalties(lam[0, 0], lam[0, 1], ridge[0])
        return Penalties(lam[:, 0], lam[:, 1], ridge)

    def forward(
        self,
        X,
        B,
        gene_weights,
        graph: dict | None = None,
        V0=None,
        noise: EntryNoise | None = None,
    ) -> torch.Tensor:
        """Differentiable unrolled pass; returns mRNA fractions V (spots x types).

        ``graph``: the edge list of :func:`graph_tensors`. ``noise``: library sizes and
        overdispersion, needed (only) by a per-entry-weights model; its weights are recomputed
        from the detached V, so gradients flow through the updates."""
        data, start = self._data_term(X, B, gene_weights, noise)
        s = self.sigmas()
        return run_layers(
            start if V0 is None else V0,
            data,
            self._penalties(as_numbers=False),
            self.n_layers,
            graph=None if graph is None else LearnedGraph(graph, s[0], s[1]),
            omega=self.omega(),
        )

    @torch.no_grad()
    def infer(
        self,
        X,
        B,
        gene_weights,
        graph: SpatialGraph | None = None,
        callback=None,
        n_layers=None,
        gram=None,
        noise: EntryNoise | None = None,
    ):
        """Fast in-place inference (no autograd, sparse CSR graph built once).

        ``gram``: ``(BtX, BtB)`` from :meth:`gram` when the caller already has them (gene
        weights only). ``noise``: see :meth:`forward`.
        """
        data, start = self._data_term(X, B, gene_weights, noise, gram)
        s = self.sigmas().cpu().numpy()
        adjacency = (
            None
            if graph is None or graph.n_edges == 0
            else graph.adjacency(float(s[0]), float(s[1]))
        )
        fixed_graph = inference_graph(adjacency, start.device, start.dtype)
        penalties = self._penalties(as_numbers=True, device=start.device, dtype=start.dtype)
        # a part of a tiled slide starts from the ω its calibration sample ended with
        omega = float(self.omega()) if self.fixed_omega is None else float(self.fixed_omega)
        while True:
            if noise is not None and noise.scale_log is not None:
                noise.scale_log.clear()  # the scales of the run that is kept, not of a damped one
            V = run_layers(
                start.clone(),
                data,
                penalties,
                n_layers or self.n_layers,
                graph=fixed_graph,
                omega=omega,
                in_place=True,
                callback=callback,
            )
            if _bounded(V) or omega <= 1.0:
                self.last_omega = omega
                return V
            # parameters learned on crops of simulated slides can over-relax too far on spots
            # unlike any of them: halve the over-relaxation until the updates stay bounded,
            # straight to the plain update (ω = 1) once the excess is small (halving 1.02 for
            # ever re-ran all layers ~10 times on low-count bins that ω does not explain)
            excess = (omega - 1.0) / 2
            damped = 1.0 + excess if excess >= MIN_OVER_RELAXATION else 1.0
            warnings.warn(
                f"the learned over-relaxation ω={omega:.2f} diverged on this slide; "
                f"re-running with ω={damped:.2f}",
                RuntimeWarning,
                stacklevel=2,
            )
            omega = damped

    def describe(self) -> dict:
        """Learned hyper-parameters as plain numbers (for reports and ``uns``)."""
        lam = self.lambdas().detach().cpu().numpy()
        s = self.sigmas().detach().cpu().numpy()
        gw = self.learned_gene_weights().detach().cpu().numpy()
        return {
            "lambda_graph": lam[:, 0].tolist() if not self.tied else float(lam[0, 0]),
            "lambda_sum": lam[:, 1].tolist() if not self.tied else float(lam[0, 1]),
            "lambda_ridge": lam[:, 2].tolist() if not self.tied else float(lam[0, 2]),
            "sigma_distance": float(s[0]),
            "sigma_feature": float(s[1]),
            "n_layers": self.n_layers,
            "omega": float(self.omega().detach()),
            "cell_smoothing": float(self.cell_smoothing().detach()),
            "cell_sigma": float(self.cell_sigma().detach()),
            "tied": self.tied,
            "gene_weight_range": [float(gw.min()), float(gw.max())],
            "refresh_layers": None if self.refresh_layers is None else list(self.refresh_layers),
        }

    # persistence: a small file with the state and the names it applies to
    def save(self, path, *, genes=None, cell_types=None, extra: dict | None = None) -> Path:
        path = Path(path)
        torch.save(
            {
                "format": "napari-stlnmf/unrolled-v1",
                "state": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "n_layers": self.n_layers,
                "tied": self.tied,
                "refresh_layers": None
                if self.refresh_layers is None
                else list(self.refresh_layers),
                "genes": None if genes is None else [str(g) for g in genes],
                "cell_types": None if cell_types is None else [str(c) for c in cell_types],
                "extra": extra or {},
            },
            path,
        )
        return path

    @staticmethod
    def _read(path) -> dict:
        """The saved blob, checked to be a napari-stlnmf parameter file."""
        try:
            blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FileFormatError(f"cannot read model parameters from {path}: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format") != "napari-stlnmf/unrolled-v1":
            raise FileFormatError(f"{path} is not a napari-stlnmf parameter file")
        return blob

    @classmethod
    def saved_extra(cls, path) -> dict:
        """The ``extra`` dict stored with saved parameters (e.g. the gene weighting they were
        trained with)."""
        return dict(cls._read(path).get("extra") or {})

    @classmethod
    def load(cls, path, *, genes=None, n_types: int | None = None) -> tuple[UnrolledNMF, dict]:
        """Load saved parameters; gene weights are mapped by name onto ``genes``.

        Genes the file does not know get weight 1; per-type weights are only kept when the
        cell types match.
        """
        blob = cls._read(path)
        state = blob["state"]
        saved_genes = blob.get("genes")
        m = len(genes) if genes is not None else state["log_gene_weight"].numel()
        p = n_types if n_types is not None else state["log_type_weight"].numel()
        model = cls(m, p, n_layers=blob["n_layers"], tied=blob["tied"])
        if blob.get("refresh_layers") is not None:
            model.refresh_layers = tuple(int(k) for k in blob["refresh_layers"])
        with torch.no_grad():
            model.log_lambda.copy_(state["log_lambda"])
            model.raw_sigma.copy_(state["raw_sigma"])
            if "raw_omega" in state:
                model.raw_omega.copy_(state["raw_omega"])
            # files saved before the cell-fraction head: no smoothing, as they were trained
            model.log_cell_smoothing.fill_(
                float(state.get("log_cell_smoothing", np.log(NO_CELL_SMOOTHING)))
            )
            if "raw_cell_sigma" in state:
                model.raw_cell_sigma.copy_(state["raw_cell_sigma"])
            if state["log_type_weight"].numel() == p:
                model.log_type_weight.copy_(state["log_type_weight"])
            if genes is not None and saved_genes is not None:
                lookup = {g: i for i, g in enumerate(saved_genes)}
                lw = state["log_gene_weight"]
                for j, gname in enumerate(genes):
                    i = lookup.get(str(gname))
                    if i is not None:
                        model.log_gene_weight[j] = lw[i]
            elif state["log_gene_weight"].numel() == m:
                model.log_gene_weight.copy_(state["log_gene_weight"])
        return model, blob
