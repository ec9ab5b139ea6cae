"""The multiplicative update of STL NMF: one layer, shared by training and inference.

Layout: proportions ``V`` are stored spots x types (the transpose of method.md), so the
graph product ``A @ V`` is a sparse-times-dense product over contiguous rows.

One layer (method.md, sum-to-one term taken per spot so λ2 does not grow with n)::

    V <- V * ((BtX + λ2 + λ1 A V) / (V·Gram + V (diag(ridge) + λ2 11ᵀ) + λ1 d ⊙ V + ε)) ** ω

with ``ridge = 2 λ3 w3²``, ``d = A 1`` and ω the over-relaxation exponent (1: plain MU). The
data term is either one Gram matrix for every spot (gene weights: ``Bw = diag(g) B``,
``BtX = X diag(g) Bw``, ``V·Gram = V BtB``, see :class:`SharedGram`) or one per spot (per-entry
weights ``W_sg = 1 / (μ_sg/L_s + φ μ_sg²)``, the inverse of a negative-binomial variance:
``G_s = Bᵀ diag(W_s) B``, ``V·Gram = v_sᵀ G_s``, see :class:`PerSpotGram`), recomputed from the
current V at a few layers (IRLS, :class:`EntryWeights`). No thresholding inside layers (zeros
could never revive); tiny proportions are zeroed once at the end.

:func:`update_layer` is that layer, written once: out of place and differentiable for training,
or in place in preallocated buffers for inference (memory-bound at 10^6 spots: six passes over V
per layer). :func:`run_layers` is the loop around it that training, inference and the classic
solver share.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .graph import SpatialGraph

__all__ = [
    "EntryNoise",
    "EntryWeights",
    "LayerTerms",
    "LearnedGraph",
    "Penalties",
    "PerSpotGram",
    "SharedGram",
    "Workspace",
    "edge_weights",
    "entry_weighted_gram",
    "flush_denormals",
    "gram_bytes",
    "gram_times",
    "graph_tensors",
    "inference_graph",
    "normal_equations",
    "objective",
    "run_layers",
    "solve",
    "uniform_start",
    "update_layer",
]

EPS = 1e-10
MU_FLOOR = 1e-9  # fitted expression floor of the per-entry weights
GRAM_CHUNK = 1024  # spots per block when forming per-entry weights (dense spots x genes)
UNPACK_CHUNK = 16_384  # spots per block when reading compact Gram matrices
PLAIN_MU_TOLERANCE = 1e-6  # |ω - 1| below which a float ω takes the plain multiplicative update


# ---------------------------------------------------------------------------------------------
# graphs: learned edge weights (training) and fixed ones (inference)


def graph_tensors(graph: SpatialGraph | None, device=None) -> dict | None:
    """Edge list of ``graph`` as torch tensors (for the differentiable path)."""
    if graph is None or graph.n_edges == 0:
        return None
    return {
        "rows": torch.as_tensor(graph.rows, device=device),
        "cols": torch.as_tensor(graph.cols, device=device),
        "distance": torch.as_tensor(graph.distance, device=device),
        "feature_distance": None
        if graph.feature_distance is None
        else torch.as_tensor(graph.feature_distance, device=device),
        "n_spots": graph.n_spots,
    }


def edge_weights(g: dict, sigma_distance, sigma_feature) -> torch.Tensor:
    logw = -((g["distance"] / sigma_distance) ** 2)
    if g["feature_distance"] is not None:
        logw = logw - (g["feature_distance"] / sigma_feature) ** 2
    return torch.exp(logw)


class _GraphProduct(torch.autograd.Function):
    """``A V`` for a symmetric sparse ``A`` with differentiable edge weights.

    Forward and the gradient in V use a CSR product (much faster than gather/scatter);
    the gradient of the weights is ``dL/dw_e = <G[row_e], V[col_e]>`` (a sampled product).
    """

    @staticmethod
    def forward(ctx, w, V, crow, col):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            n = V.shape[0]
            A = torch.sparse_csr_tensor(crow, col, w.detach(), size=(n, n), device=V.device)
        ctx.save_for_backward(V)
        ctx.A = A
        return torch.sparse.mm(A, V.detach())

    @staticmethod
    def backward(ctx, grad):
        (V,) = ctx.saved_tensors
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            # (G Vᵀ) sampled on A's pattern = <G[row_e], V[col_e]>, without gathering
            grad_w = torch.sparse.sampled_addmm(ctx.A, grad.contiguous(), V.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_v = torch.sparse.mm(ctx.A, grad)  # A is symmetric
        return grad_w, grad_v, None, None


class LearnedGraph:
    """``A`` with edge weights ``exp(-(d/σd)² - (f/σf)²)`` differentiable in the σ's (training).

    ``g``: the edge list of :func:`graph_tensors` (sorted by row, then column)."""

    def __init__(self, g: dict, sigma_distance, sigma_feature):
        self.g = g
        self.w = edge_weights(g, sigma_distance, sigma_feature)
        if "crow" not in g:
            counts = torch.bincount(g["rows"], minlength=g["n_spots"])
            g["crow"] = torch.cat(
                [torch.zeros(1, dtype=torch.int64, device=counts.device), counts.cumsum(0)]
            )
        degree = torch.zeros(g["n_spots"], dtype=self.w.dtype, device=self.w.device)
        self.degree = degree.index_add_(0, g["rows"], self.w)[:, None]  # A 1, a column

    def product(self, V: torch.Tensor) -> torch.Tensor:
        return _GraphProduct.apply(self.w, V, self.g["crow"], self.g["cols"])

    def add_product(self, V, out, scale) -> torch.Tensor:
        """``out + scale A V`` as a new tensor."""
        return out + scale * self.product(V)


class _ScipyGraph:
    """Fixed ``A`` on the CPU: ``out += scale A V`` with scipy's CSR kernel, in place (no
    temporaries; accumulating in place measured faster than torch's sparse addmm)."""

    def __init__(self, adjacency, dtype, degree):
        a = adjacency.tocsr().astype(np.float32 if dtype == torch.float32 else np.float64)
        a.sort_indices()
        self.a = a
        self.degree = degree
        self.scaled = (None, None)
        try:
            from scipy.sparse._sparsetools import csr_matvecs

            self.kernel = csr_matvecs
        except ImportError:  # private scipy API: fall back to a product with a temporary
            self.kernel = None

    def add_product(self, V, out, scale):
        if self.scaled[0] != scale:
            self.scaled = (scale, (self.a.data * scale).astype(self.a.data.dtype))
        data = self.scaled[1]
        v, o = V.numpy(), out.numpy()
        if self.kernel is not None and v.flags.c_contiguous and o.flags.c_contiguous:
            n, m = self.a.shape
            self.kernel(n, m, v.shape[1], self.a.indptr, self.a.indices, data, v.ravel(), o.ravel())
        else:
            o += self.a.__class__((data, self.a.indices, self.a.indptr), shape=self.a.shape) @ v
        return out


class _TorchGraph:
    """Fixed ``A`` on other devices: ``out += scale A V`` with torch's sparse product."""

    def __init__(self, adjacency, device, dtype, degree):
        a = adjacency.tocsr()
        with warnings.catch_warnings():  # "beta support" notices, not actionable for users
            warnings.simplefilter("ignore", UserWarning)
            self.A = torch.sparse_csr_tensor(
                torch.as_tensor(a.indptr, dtype=torch.int64, device=device),
                torch.as_tensor(a.indices, dtype=torch.int64, device=device),
                torch.as_tensor(a.data, dtype=dtype, device=device),
                size=a.shape,
                device=device,
            )
        self.degree = degree

    def add_product(self, V, out, scale):
        return out.add_(torch.sparse.mm(self.A, V), alpha=scale)


def inference_graph(adjacency, device, dtype, *, kernel: str = "auto"):
    """The fixed graph of in-place inference from a scipy sparse ``adjacency``, or None.

    ``kernel``: 'scipy' (CPU only), 'torch', or 'auto' (scipy on the CPU)."""
    if adjacency is None or not adjacency.nnz:
        return None
    device = torch.device(device)
    degree = np.asarray(adjacency.sum(1)).ravel()
    degree = torch.as_tensor(degree, device=device, dtype=dtype)[:, None]
    if kernel == "scipy" or (kernel == "auto" and device.type == "cpu"):
        return _ScipyGraph(adjacency, dtype, degree)
    return _TorchGraph(adjacency, device, dtype, degree)


# ---------------------------------------------------------------------------------------------
# data terms: one Gram matrix for every spot, or one per spot


def normal_equations(X, B: torch.Tensor, g2: torch.Tensor):
    """``BtX = X Bw`` (spots x types) and ``BtB = Bᵀ Bw`` with ``Bw = diag(g2) B``.

    ``X`` is a dense tensor or a scipy sparse matrix (large slides stay sparse)."""
    Bw = B * g2[:, None]
    if sp.issparse(X):
        BtX = torch.as_tensor(np.asarray(X @ Bw.detach().cpu().numpy()), device=B.device)
    else:
        BtX = X @ Bw
    return BtX, B.T @ Bw


def _ones(p: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(p, p, dtype=like.dtype, device=like.device)


class SharedGram:
    """The data term with one Gram matrix for every spot: ``V·Gram = V BtB``.

    The ridge and sum-to-one terms fold into it (``M = BtB + diag(ridge) + λ2 11ᵀ``, formed once
    per parameter set) so the denominator costs one product."""

    def __init__(self, BtX: torch.Tensor, BtB: torch.Tensor):
        self.BtX, self.BtB = BtX, BtB
        self.eps = torch.full((1, BtX.shape[1]), EPS, dtype=BtX.dtype, device=BtX.device)

    def quadratic(self, ridge, lam2) -> torch.Tensor:
        return self.BtB + torch.diag(ridge) + lam2 * _ones(self.BtB.shape[0], self.BtB)

    def denominator(self, V, quadratic, out=None) -> torch.Tensor:
        """``V M + ε``."""
        return torch.addmm(self.eps, V, quadratic, out=out)


class PerSpotGram:
    """The data term with one Gram matrix per spot: ``V·Gram = v_sᵀ G_s``.

    ``G``: spots x p x p, or compact (spots x p(p+1)/2 upper triangles, bfloat16)."""

    def __init__(self, BtX: torch.Tensor, G: torch.Tensor):
        self.BtX, self.G = BtX, G

    def quadratic(self, ridge, lam2) -> torch.Tensor:
        return torch.diag(ridge) + lam2 * _ones(ridge.shape[0], ridge)

    def denominator(self, V, quadratic, out=None) -> torch.Tensor:
        """``v_sᵀ G_s + V (diag(ridge) + λ2 11ᵀ) + ε``."""
        den = gram_times(V, self.G, out)
        den = torch.addmm(den, V, quadratic, out=out)
        return torch.add(den, EPS, out=out)


@dataclass(frozen=True)
class EntryNoise:
    """What per-entry weights need besides the fit: each spot's library size and the slide's
    overdispersion ``φ`` (``Var(x_sg) = μ_sg/L_s + φ μ_sg²`` on rows summing to one; 0 = Poisson).

    The library sizes go to the device of the fit when the weights are formed."""

    library_size: torch.Tensor
    overdispersion: float = 0.0
    # store each spot's Gram matrix as its upper triangle in bfloat16 (a quarter of the memory,
    # what lets Visium HD slides fit), read row by row of the triangle in each layer
    compact_gram: bool = False
    # the Gram matrices' scale at layer 0 and at each refresh, fixed (a tiled slide: measured
    # once on its calibration sample, so that no tile's scale depends on the tile); None: each
    # formed matrix's own mean diagonal
    gram_scales: tuple[float, ...] | None = None
    # when a list, the scale of each Gram formed is appended to it (what gram_scales records)
    scale_log: list | None = None

    def scale_at(self, refresh: int) -> float | None:
        """The fixed scale of the ``refresh``-th Gram (0: layer 0), None when not fixed."""
        if not self.gram_scales:
            return None
        return float(self.gram_scales[min(refresh, len(self.gram_scales) - 1)])


@dataclass(frozen=True)
class EntryWeights:
    """The per-entry-weights data term: per-spot Gram matrices recomputed from the current V
    (detached) at layer 0 and at ``refresh_layers``."""

    X: object  # spots x genes, dense tensor or scipy sparse
    B: torch.Tensor
    noise: EntryNoise
    refresh_layers: tuple[int, ...] = ()

    def at(self, V: torch.Tensor, refresh: int = 0) -> PerSpotGram:
        """The data term at V, the ``refresh``-th formed in a run (0: at layer 0)."""
        scale = self.noise.scale_at(refresh)
        return PerSpotGram(*entry_weighted_gram(self.X, self.B, V, self.noise, scale=scale))


def gram_bytes(n_spots: int, n_types: int, compact: bool = False) -> int:
    """Memory of the per-spot Gram matrices of per-entry weights."""
    return n_spots * (n_types * (n_types + 1) if compact else 4 * n_types * n_types)


def _triangle(p: int, device):
    """Indices of the upper triangle (k <= l) and its flat positions in p x p and mirrored."""
    upper = torch.triu_indices(p, p, device=device)
    return upper, (upper[0] * p + upper[1], upper[1] * p + upper[0])


def _unpack_gram(packed: torch.Tensor, p: int, flat, dtype) -> torch.Tensor:
    """Full p x p matrices from upper triangles (spots x p(p+1)/2)."""
    values = packed.to(dtype)
    out = torch.empty(packed.shape[0], p * p, dtype=dtype, device=packed.device)
    out[:, flat[0]] = values
    out[:, flat[1]] = values
    return out.view(-1, p, p)


def _gram_times_into(V: torch.Tensor, G: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if G.ndim == 3:  # G_s symmetric: v_sᵀ G_s, reads G_s in its memory order, faster than bmm(G, v)
        torch.bmm(V.unsqueeze(1), G, out=out.unsqueeze(1))
        return out
    # compact: row k of the upper triangle holds G_kl for l >= k, contiguous; read it once for the
    # l >= k part and, by symmetry, for the l > k terms of column k (faster than unpacking)
    p = V.shape[1]
    offsets = np.concatenate([[0], np.cumsum(np.arange(p, 0, -1))])
    for start in range(0, V.shape[0], UNPACK_CHUNK):
        stop = min(start + UNPACK_CHUNK, V.shape[0])
        block, v, o = G[start:stop].to(V.dtype), V[start:stop], out[start:stop]
        o.zero_()
        for k in range(p):
            row = block[:, offsets[k] : offsets[k + 1]]
            o[:, k:].addcmul_(v[:, k : k + 1], row)
            o[:, k] += (v[:, k + 1 :] * row[:, 1:]).sum(1)
    return out


class _GramTimes(torch.autograd.Function):
    """``v_sᵀ G_s`` differentiable in V; G_s symmetric, so the gradient is the same product."""

    @staticmethod
    def forward(ctx, V, G):
        ctx.save_for_backward(G)
        return _gram_times_into(V.detach(), G, torch.empty_like(V))

    @staticmethod
    def backward(ctx, grad):
        (G,) = ctx.saved_tensors
        return _gram_times_into(grad.contiguous(), G, torch.empty_like(grad)), None


def gram_times(V: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out_s = v_sᵀ G_s`` for full (spots x p x p) or compact (spots x p(p+1)/2) Gram matrices;
    differentiable in V when it requires gradients (then ``out`` must be None)."""
    if torch.is_grad_enabled() and V.requires_grad:
        if out is not None:
            raise ValueError("gram_times: out= is for the in-place path (no gradients)")
        return _GramTimes.apply(V, G)
    return _gram_times_into(V, G, torch.empty_like(V) if out is None else out)


def _weighted_btx(X, start, stop, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(W ⊙ X[start:stop]) B``; for a sparse X only its stored entries are weighted."""
    if not sp.issparse(X):
        return (W * torch.as_tensor(X[start:stop], dtype=W.dtype, device=W.device)) @ B
    x = X[start:stop].tocsr()
    rows = torch.as_tensor(np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), device=W.device)
    cols = torch.as_tensor(x.indices.astype(np.int64), device=W.device)
    values = W[rows, cols] * torch.as_tensor(x.data, dtype=W.dtype, device=W.device)
    weighted = sp.csr_matrix((values.cpu().numpy(), x.indices, x.indptr), shape=x.shape)
    return torch.as_tensor(np.asarray(weighted @ B.cpu().numpy()), device=W.device)


@torch.no_grad()
def entry_weighted_gram(
    X,
    B: torch.Tensor,
    V: torch.Tensor,
    noise: EntryNoise,
    chunk: int = GRAM_CHUNK,
    scale: float | None = None,
):
    """Per-spot ``BtX_s = Bᵀ W_s x_s`` (spots x types) and ``G_s = Bᵀ diag(W_s) B``
    (spots x types x types) with ``W_sg = 1/(μ_sg/L_s + φ μ_sg²)``, ``μ = V Bᵀ`` (V detached).

    Scaled so that the mean diagonal of ``G_s`` is one, the scale the gene weights have, so the
    λ's keep their meaning (or by a given ``scale``, the same for every part of a tiled slide;
    ``noise.scale_log`` collects the scales used). Formed in blocks of ``chunk`` spots: dense
    spots x genes per block only.
    """
    V = V.detach()
    n, p = V.shape
    m = B.shape[0]
    Bd = B.to(device=V.device, dtype=V.dtype)
    # G_s is symmetric: one GEMM against the products of B's columns k <= l, then mirrored
    upper, flat = _triangle(p, V.device)
    BB = Bd[:, upper[0]] * Bd[:, upper[1]]
    compact = noise.compact_gram
    diagonal = upper[0] == upper[1]

    def gram(W):
        packed = W @ BB
        return packed.to(torch.bfloat16) if compact else _unpack_gram(packed, p, flat, W.dtype)

    lib = torch.as_tensor(noise.library_size, dtype=V.dtype, device=V.device).clamp_min(1.0)
    phi = float(noise.overdispersion)

    def weights(mu, L):
        W = mu / L[:, None]
        if phi > 0:
            W.addcmul_(mu, mu, value=phi)
        return W.reciprocal_()

    BtX = torch.empty(n, p, dtype=V.dtype, device=V.device)
    shared = None
    if n > 1 and bool((V == V[:1]).all()):
        # one fit for every spot (the uniform start): weights depend on the library size only,
        # and spots share few distinct library sizes (counts are integers)
        sizes, which = torch.unique(lib, return_inverse=True)
        if len(sizes) <= n // 2:
            mu = (V[:1] @ Bd.T).clamp_min_(MU_FLOOR).expand(len(sizes), m).contiguous()
            W_sizes = weights(mu, sizes)
            shared = (W_sizes, which)
            G = gram(W_sizes)[which]
    if shared is None:
        G = (
            torch.empty(n, len(upper[0]), dtype=torch.bfloat16, device=V.device)
            if compact
            else torch.empty(n, p, p, dtype=V.dtype, device=V.device)
        )
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if shared is None:
            W = weights((V[start:stop] @ Bd.T).clamp_min_(MU_FLOOR), lib[start:stop])
            G[start:stop] = gram(W)
        else:
            W = shared[0][shared[1][start:stop]]
        BtX[start:stop] = _weighted_btx(X, start, stop, W, Bd)
    if scale is not None:
        scale = torch.as_tensor(scale, dtype=V.dtype, device=V.device)
    elif compact:
        scale = G[:, diagonal].float().mean().clamp_min(EPS)  # bfloat16 keeps float32's range
    else:
        scale = G.diagonal(dim1=1, dim2=2).mean().clamp_min(EPS)
    if noise.scale_log is not None:
        noise.scale_log.append(float(scale))
    return BtX.div_(scale), G.div_(scale)


# ---------------------------------------------------------------------------------------------
# the layer and the loop around it


@dataclass(frozen=True)
class Penalties:
    """λ1 (graph), λ2 (sum to one) and the per-type ridge ``2 λ3 w3²`` of the layers.

    λ1 and λ2 are numbers (in place) or 0-d tensors (differentiable), or one per layer (a
    sequence or 1-d tensor); ``ridge`` is a tensor, (types,) or one row per layer (layers, types).
    """

    graph: object
    total: object
    ridge: torch.Tensor

    @property
    def per_layer(self) -> bool:
        return _is_sequence(self.graph) or _is_sequence(self.total) or self.ridge.ndim == 2

    def at(self, k: int):
        """Layer ``k``'s ``(λ1, λ2, ridge)``."""
        ridge = self.ridge[k] if self.ridge.ndim == 2 else self.ridge
        return _layer_value(self.graph, k), _layer_value(self.total, k), ridge


def _is_sequence(value) -> bool:
    return value.ndim > 0 if isinstance(value, torch.Tensor) else bool(np.ndim(value))


def _layer_value(value, k: int):
    if isinstance(value, torch.Tensor):
        return value[k] if value.ndim else value
    return float(value[k]) if np.ndim(value) else float(value)


@dataclass(frozen=True)
class LayerTerms:
    """The constants of one parameter set: λ1, λ2, the p x p quadratic term of the data term and
    the graph's degree term ``degree_scale * degree = λ1 A 1`` (None without a graph term)."""

    lam1: object
    lam2: object
    quadratic: torch.Tensor
    degree: torch.Tensor | None
    degree_scale: float = 1.0

    @classmethod
    def of(cls, data, graph, lam1, lam2, ridge) -> LayerTerms:
        quadratic = data.quadratic(ridge, lam2)
        if isinstance(lam1, torch.Tensor):  # addcmul's scale must be a number: fold λ1 in
            return cls(lam1, lam2, quadratic, None if graph is None else graph.degree * lam1)
        if graph is None or not lam1:
            return cls(lam1, lam2, quadratic, None)
        return cls(lam1, lam2, quadratic, graph.degree, lam1)


@dataclass(frozen=True)
class Workspace:
    """Buffers of the in-place layer."""

    num: torch.Tensor
    den: torch.Tensor

    @classmethod
    def like(cls, V: torch.Tensor) -> Workspace:
        return cls(torch.empty_like(V), torch.empty_like(V))


def _plain(omega) -> bool:
    return not isinstance(omega, torch.Tensor) and abs(omega - 1.0) < PLAIN_MU_TOLERANCE


def update_layer(V, data, terms: LayerTerms, graph, omega, workspace: Workspace | None = None):
    """One multiplicative update ``V (num/den)^ω`` with ``num = BtX + λ2 + λ1 A V`` and
    ``den = V·Gram + V (diag(ridge) + λ2 11ᵀ) + λ1 d ⊙ V + ε`` (``data`` gives ``V·Gram`` and
    folds the p x p part into ``terms.quadratic``).

    With a ``workspace`` (and a fixed graph) V is updated in place; without, every step builds a
    new tensor (differentiable in V, the λ's, ω and a :class:`LearnedGraph`'s weights)."""
    num_out, den_out = (None, None) if workspace is None else (workspace.num, workspace.den)
    V_out = None if workspace is None else V
    num = torch.add(data.BtX, terms.lam2, out=num_out)
    den = data.denominator(V, terms.quadratic, out=den_out)
    if terms.degree is not None:
        num = graph.add_product(V, num, terms.lam1)
        den = torch.addcmul(den, V, terms.degree, value=terms.degree_scale, out=den_out)
    if _plain(omega):
        return torch.div(torch.mul(V, num, out=V_out), den, out=V_out)
    ratio = torch.pow(torch.div(num, den, out=num_out), omega, out=num_out)
    return torch.mul(V, ratio, out=V_out)


@contextmanager
def flush_denormals():
    """Proportions decaying towards zero hit float32 denormals, which are many times slower."""
    previous = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not previous:
            torch.set_flush_denormal(False)


def run_layers(
    V: torch.Tensor,
    data,
    penalties: Penalties,
    n_layers: int,
    *,
    graph=None,
    omega=1.0,
    in_place: bool = False,
    tol: float | None = None,
    callback=None,
) -> torch.Tensor:
    """``n_layers`` updates of :func:`update_layer` from ``V``.

    ``data``: a :class:`SharedGram` or :class:`PerSpotGram`, or :class:`EntryWeights` (per-spot
    Gram matrices formed from the current V at layer 0 and its refresh layers).
    ``graph``: a :class:`LearnedGraph` (differentiable), :func:`inference_graph`'s, or None.
    ``in_place``: update V in place in preallocated buffers, without autograd (inference);
    else out of place and differentiable. ``callback(i, n)`` is called every 10 layers and at
    the last (progress and cancellation). Stops early when the largest change of V over 10
    layers falls below ``tol``."""
    weights = data if isinstance(data, EntryWeights) else None
    workspace = Workspace.like(V) if in_place else None
    previous = V.clone() if tol else None
    terms = None
    with torch.no_grad() if in_place else nullcontext(), flush_denormals():
        refreshes = 0
        for k in range(n_layers):
            if weights is not None and (k == 0 or k in weights.refresh_layers):
                data, terms = weights.at(V, refreshes), None
                refreshes += 1
            if terms is None or penalties.per_layer:
                terms = LayerTerms.of(data, graph, *penalties.at(k))
            V = update_layer(V, data, terms, graph, omega, workspace)
            if callback is not None and (k % 10 == 9 or k == n_layers - 1):
                callback(k + 1, n_layers)
            if tol and k % 10 == 9:
                if float((V - previous).abs().max()) < tol:
                    break
                previous.copy_(V)
    return V


def uniform_start(n: int, p: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Every spot starts from equal proportions ``1/p``."""
    return torch.full((n, p), 1.0 / p, dtype=dtype or like.dtype, device=like.device)


@torch.no_grad()
def solve(
    BtX: torch.Tensor,
    BtB: torch.Tensor,
    *,
    adjacency=None,
    lam1=0.0,
    lam2=0.0,
    ridge=None,
    n_iter: int = 100,
    tol: float | None = None,
    V0: torch.Tensor | None = None,
    callback=None,
    omega: float = 1.0,
) -> torch.Tensor:
    """Multiplicative updates with fixed parameters and one Gram matrix, in place.

    ``lam1``/``lam2``/``ridge`` may be given per layer (a sequence; ridge (n_iter, types)).
    ``adjacency`` is a scipy sparse matrix. See :func:`run_layers` for ``tol`` and ``callback``.
    """
    n, p = BtX.shape
    dev, dt = BtX.device, BtX.dtype
    V = uniform_start(n, p, BtX) if V0 is None else V0.to(device=dev, dtype=dt, copy=True)
    ridge = (
        torch.zeros(p, device=dev, dtype=dt)
        if ridge is None
        else torch.as_tensor(ridge, device=dev, dtype=dt)
    )
    return run_layers(
        V,
        SharedGram(BtX, BtB),
        Penalties(lam1, lam2, ridge),
        n_iter,
        graph=inference_graph(adjacency, dev, dt),
        omega=float(omega),
        in_place=True,
        tol=tol,
        callback=callback,
    )


def objective(V, X, B, lam1, lam2, ridge, A=None) -> float:
    """F(V) of method.md for V spots x types (scaled X spots x genes, B genes x types)."""
    V = torch.as_tensor(V, dtype=torch.float64)
    X = torch.as_tensor(X, dtype=torch.float64, device=V.device)
    B = torch.as_tensor(B, dtype=torch.float64, device=V.device)
    f = ((X - V @ B.T) ** 2).sum()
    if A is not None and lam1:
        A = torch.as_tensor(
            A.toarray() if hasattr(A, "toarray") else A, dtype=torch.float64, device=V.device
        )
        L = torch.diag(A.sum(1)) - A
        f = f + lam1 * torch.trace(V.T @ L @ V)
    f = f + lam2 * ((V.sum(1) - 1) ** 2).sum()
    f = f + (torch.as_tensor(ridge, dtype=torch.float64, device=V.device) * V**2).sum()
    return float(f)
