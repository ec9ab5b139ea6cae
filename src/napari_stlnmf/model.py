"""STL NMF: the multiplicative update, classic (fixed λ) and unrolled (learned) forms.

Layout: proportions ``V`` are stored spots x types (the transpose of method.md), so the
graph product ``A @ V`` is a sparse-times-dense product over contiguous rows.

One layer (method.md, sum-to-one term taken per spot so λ2 does not grow with n)::

    V <- V * (BtX + λ1 A V + λ2) / (V BtB + λ1 D V + λ2 rowsum(V) + 2 λ3 V diag(w3²) + ε)

with ``Bw = diag(g) B``, ``Xw = X diag(g)`` (g = gene weights), ``BtX = Xw Bw`` and
``BtB = Bwᵀ Bw``. No thresholding inside layers (zeros could never revive); tiny
proportions are zeroed once at the end.
Per-entry weights (``gene_weighting='nb'``): the data term weighs each spot and gene by
``W_sg = 1 / (μ_sg/L_s + φ μ_sg²)``, the inverse of a negative-binomial variance (``μ = V Bᵀ``
the current fit on rows summing to one, ``L`` the spot's library size, ``φ`` the slide's
measured overdispersion), recomputed from the current V at a few layers (IRLS). A layer then
uses per-spot Gram matrices ``G_s = Bᵀ diag(W_s) B`` instead of one ``BtB``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .errors import FileFormatError
from .graph import SpatialGraph

__all__ = [
    "DEFAULTS",
    "EntryNoise",
    "UnrolledNMF",
    "entry_weighted_gram",
    "finalize_proportions",
    "objective",
    "solve",
    "to_cell_fractions",
    "update_step",
]

EPS = 1e-10
MU_FLOOR = 1e-9  # fitted expression floor of the per-entry weights
REFRESH_LAYERS = (0, 15, 40)  # layers at which per-entry weights are recomputed
GRAM_CHUNK = 1024  # spots per block when forming per-entry weights (dense spots x genes)
SIGMA_RANGE = (0.25, 8.0)  # σ's in spot spacings / standardised feature units
OMEGA_RANGE = (0.5, 2.0)  # over-relaxation exponent of the multiplicative update


CELL_SMOOTHING_STEPS = 3  # Jacobi steps of the cell-fraction head
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


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def graph_tensors(graph: SpatialGraph | None, device=None) -> dict | None:
    """Edge list of ``graph`` as torch tensors (for the differentiable path)."""
    if graph is None or graph.n_edges == 0:
        return None
    out = {
        "rows": torch.as_tensor(graph.rows, device=device),
        "cols": torch.as_tensor(graph.cols, device=device),
        "distance": torch.as_tensor(graph.distance, device=device),
        "feature_distance": None
        if graph.feature_distance is None
        else torch.as_tensor(graph.feature_distance, device=device),
        "n_spots": graph.n_spots,
    }
    return out


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
    def forward(ctx, w, V, crow, col, rows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            A = torch.sparse_csr_tensor(crow, col, w.detach(), size=(V.shape[0], V.shape[0]))
        ctx.save_for_backward(V, col, rows)
        ctx.A = A
        return torch.sparse.mm(A, V.detach())

    @staticmethod
    def backward(ctx, grad):
        V, col, rows = ctx.saved_tensors
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            # (G Vᵀ) sampled on A's pattern = <G[row_e], V[col_e]>, without gathering
            grad_w = torch.sparse.sampled_addmm(ctx.A, grad.contiguous(), V.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_v = torch.sparse.mm(ctx.A, grad)  # A is symmetric
        return grad_w, grad_v, None, None, None


def _graph_product(g: dict, w: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """A V with A given by edges (sorted by row, then column) and weights w."""
    if "crow" not in g:
        counts = torch.bincount(g["rows"], minlength=g["n_spots"])
        g["crow"] = torch.cat(
            [torch.zeros(1, dtype=torch.int64, device=counts.device), counts.cumsum(0)]
        )
    return _GraphProduct.apply(w, V, g["crow"], g["cols"], g["rows"])


@dataclass(frozen=True)
class EntryNoise:
    """What per-entry weights need besides the fit: each spot's library size and the slide's
    overdispersion ``φ`` (``Var(x_sg) = μ_sg/L_s + φ μ_sg²`` on rows summing to one; 0 = Poisson)."""

    library_size: torch.Tensor
    overdispersion: float = 0.0
    # store each spot's Gram matrix as its upper triangle in bfloat16 (a quarter of the memory:
    # 10^6 bins x 50 types in 2.6 GB instead of 10 GB), read row by row of the triangle in each layer
    compact_gram: bool = False


def gram_bytes(n_spots: int, n_types: int, compact: bool = False) -> int:
    """Memory of the per-spot Gram matrices of per-entry weights."""
    return n_spots * (n_types * (n_types + 1) if compact else 4 * n_types * n_types)


UNPACK_CHUNK = 16_384  # spots per block when reading compact Gram matrices


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


def gram_times(V: torch.Tensor, G: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out_s = v_sᵀ G_s`` for full (spots x p x p) or compact (spots x p(p+1)/2) Gram matrices."""
    if G.ndim == 3:  # G_s symmetric: v_sᵀ G_s, ~5x faster than bmm(G, v)
        return torch.bmm(V.unsqueeze(1), G, out=out.unsqueeze(1)).squeeze(1)
    # compact: row k of the upper triangle holds G_kl for l >= k, contiguous; read it once for the
    # l >= k part and, by symmetry, for the l > k terms of column k (2.5x faster than unpacking)
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
    X, B: torch.Tensor, V: torch.Tensor, noise: EntryNoise, chunk: int = GRAM_CHUNK
):
    """Per-spot ``BtX_s = Bᵀ W_s x_s`` (spots x types) and ``G_s = Bᵀ diag(W_s) B``
    (spots x types x types) with ``W_sg = 1/(μ_sg/L_s + φ μ_sg²)``, ``μ = V Bᵀ`` (V detached).

    Scaled so that the mean diagonal of ``G_s`` is one, the scale the gene weights have, so the
    λ's keep their meaning. Formed in blocks of ``chunk`` spots: dense spots x genes per block only.
    """
    V = V.detach()
    n, p = V.shape
    m = B.shape[0]
    Bd = B.to(V.dtype)
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
    if compact:
        scale = G[:, diagonal].float().mean().clamp_min(EPS)  # bfloat16 keeps float32's range
    else:
        scale = G.diagonal(dim1=1, dim2=2).mean().clamp_min(EPS)
    return BtX.div_(scale), G.div_(scale)


def _entry_step(V, BtX, G, M, lam1, lam2, dcol, graph_product, omega):
    """One layer with per-spot Gram matrices: ``M = diag(ridge) + λ2 11ᵀ``."""
    num = BtX + lam2
    if graph_product is not None:
        num = num + lam1 * graph_product(V)
    den = (
        torch.bmm(V.unsqueeze(1), G).squeeze(1) + V @ M + EPS
    )  # G_s symmetric: v_sᵀ G_s = (G_s v_s)ᵀ, ~5x bmm(G, v)
    if dcol is not None:
        den = den + dcol * V
    return V * (num / den) ** omega


def update_step(V, BtX, BtB, lam1, lam2, ridge, graph_product=None, degree=None, omega=None):
    """One multiplicative update (out of place, differentiable; reference form).

    ``omega`` (optional) over-relaxes the step: ``V * (num / den) ** omega``.

    ``ridge`` is the per-type vector ``2 λ3 w3²``; ``graph_product(V)`` returns ``A V`` and
    ``degree`` is ``A 1``.
    """
    num = BtX + lam2
    den = V @ BtB + lam2 * V.sum(1, keepdim=True) + ridge * V + EPS
    if graph_product is not None and lam1 is not None:
        num = num + lam1 * graph_product(V)
        den = den + (lam1 * degree)[:, None] * V
    if omega is None:
        return V * num / den
    return V * (num / den) ** omega


def _fused_step(V, C, M, lam1, degree_col, graph_product, omega=None):
    """The same update with constants folded: ``C = BtX + λ2``,
    ``M = BtB + diag(ridge) + λ2 11ᵀ``, ``degree_col = λ1 A1``: fewer passes per layer."""
    den = torch.addcmul(V @ M, degree_col, V) + EPS if degree_col is not None else V @ M + EPS
    num = C + lam1 * graph_product(V) if graph_product is not None else C
    if omega is None:
        return V * num / den
    return V * (num / den) ** omega


def objective(V, X, B, lam1, lam2, ridge, A=None) -> float:
    """F(V) of method.md for V spots x types (scaled X spots x genes, B genes x types)."""
    V = torch.as_tensor(V, dtype=torch.float64)
    X = torch.as_tensor(X, dtype=torch.float64)
    B = torch.as_tensor(B, dtype=torch.float64)
    f = ((X - V @ B.T) ** 2).sum()
    if A is not None and lam1:
        A = torch.as_tensor(A.toarray() if hasattr(A, "toarray") else A, dtype=torch.float64)
        L = torch.diag(A.sum(1)) - A
        f = f + lam1 * torch.trace(V.T @ L @ V)
    f = f + lam2 * ((V.sum(1) - 1) ** 2).sum()
    f = f + (torch.as_tensor(ridge, dtype=torch.float64) * V**2).sum()
    return float(f)


@contextmanager
def flush_denormals():
    """Proportions decaying towards zero hit float32 denormals, which are ~10x slower."""
    previous = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not previous:
            torch.set_flush_denormal(False)


def _csr(adjacency, device, dtype):
    a = adjacency.tocsr()
    with warnings.catch_warnings():  # "beta support" notices, not actionable for users
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.as_tensor(a.indptr, dtype=torch.int64),
            torch.as_tensor(a.indices, dtype=torch.int64),
            torch.as_tensor(a.data, dtype=dtype),
            size=a.shape,
            device=device,
        )


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
    """Run multiplicative updates with fixed parameters, in place and fused (inference path).

    ``lam1``/``lam2``/``ridge`` may be sequences (one per layer) for an untied model.
    ``adjacency`` is a scipy sparse matrix. ``callback(i, n)`` is called every few layers
    (progress and cancellation). Stops early when the largest change of V falls below ``tol``.
    """
    n, p = BtX.shape
    dev, dt = BtX.device, BtX.dtype
    V = torch.full((n, p), 1.0 / p, device=dev, dtype=dt) if V0 is None else V0.clone()
    A, deg = _inference_graph(adjacency, dev, dt)
    ridge_t = (
        torch.zeros(p, device=dev, dtype=dt)
        if ridge is None
        else torch.as_tensor(ridge, device=dev, dtype=dt)
    )
    ridges = ridge_t if ridge_t.ndim == 2 else None
    V_prev = V.clone() if tol else None
    with flush_denormals():
        _run_layers(
            V,
            BtX,
            BtB,
            A,
            deg,
            lam1,
            lam2,
            ridge_t,
            ridges,
            n_iter,
            tol,
            V_prev,
            callback,
            float(omega),
        )
    return V


def _inference_graph(adjacency, device, dtype):
    """The graph for in-place inference, ``(A, A 1 as a column)``, or ``(None, None)``."""
    if adjacency is None or not adjacency.nnz:
        return None, None
    # on the CPU scipy's CSR kernel accumulating in place is ~2x torch's sparse addmm
    A = (
        _ScipyGraph(adjacency, dtype)
        if device.type == "cpu"
        else _TorchGraph(_csr(adjacency, device, dtype))
    )
    return A, torch.as_tensor(np.asarray(adjacency.sum(1)).ravel(), device=device, dtype=dtype)[
        :, None
    ]


class _ScipyGraph:
    """``out += scale * A @ V`` with scipy's CSR kernel, writing into ``out`` (no temporaries)."""

    def __init__(self, adjacency, dtype):
        a = adjacency.tocsr().astype(np.float32 if dtype == torch.float32 else np.float64)
        a.sort_indices()
        self.a = a
        self.scaled = (None, None)
        try:
            from scipy.sparse._sparsetools import csr_matvecs

            self.kernel = csr_matvecs
        except ImportError:  # private scipy API: fall back to a product with a temporary
            self.kernel = None

    def accumulate(self, V, out, scale):
        if self.scaled[0] != scale:
            self.scaled = (scale, (self.a.data * scale).astype(self.a.data.dtype))
        data = self.scaled[1]
        v, o = V.numpy(), out.numpy()
        if self.kernel is not None and v.flags.c_contiguous and o.flags.c_contiguous:
            n, m = self.a.shape
            self.kernel(n, m, v.shape[1], self.a.indptr, self.a.indices, data, v.ravel(), o.ravel())
        else:
            o += self.a.__class__((data, self.a.indices, self.a.indptr), shape=self.a.shape) @ v


class _TorchGraph:
    def __init__(self, A):
        self.A = A

    def accumulate(self, V, out, scale):
        out.add_(torch.sparse.mm(self.A, V), alpha=scale)


def _per_layer(value, k: int) -> float:
    """Layer ``k``'s value of a parameter given per layer (a sequence) or shared (a scalar)."""
    return float(value[k]) if np.ndim(value) else float(value)


def _run_layers(
    V, BtX, BtB, A, deg, lam1, lam2, ridge_t, ridges, n_iter, tol, V_prev, callback, omega=1.0
):
    """Six fused passes over V per layer (memory-bound at 10^6 spots):
    ``num = BtX + λ2; num += λ1 A V`` (in-place sparse product), ``den = ε + V M`` (one addmm),
    ``den += λ1 d ⊙ V``, ``V *= num``, ``V /= den``; with ``M = BtB + diag(ridge) + λ2 11ᵀ``
    computed once per distinct parameter set."""
    p = V.shape[1]
    num = torch.empty_like(V)
    den = torch.empty_like(V)
    eps = torch.full((1, p), EPS, dtype=V.dtype, device=V.device)
    ones = torch.ones(p, p, dtype=V.dtype, device=V.device)
    key = None
    for k in range(n_iter):
        l1, l2 = _per_layer(lam1, k), _per_layer(lam2, k)
        r = ridges[k] if ridges is not None else ridge_t
        if key != (l1, l2) or ridges is not None:  # p x p constants of this layer's parameters
            key = (l1, l2)
            M = BtB + torch.diag(r) + l2 * ones
            dcol = deg * l1 if A is not None and l1 else None
        torch.add(
            BtX, l2, out=num
        )  # C = BtX + λ2 in the pass that fills num (per-layer λ2 for free)
        if dcol is not None:
            A.accumulate(V, num, l1)
        torch.addmm(eps, V, M, out=den)
        if dcol is not None:
            den.addcmul_(V, dcol)
        if abs(omega - 1.0) < 1e-6:
            V.mul_(num).div_(den)
        else:  # over-relaxed step
            V.mul_(num.div_(den).pow_(omega))
        if callback is not None and (k % 10 == 9 or k == n_iter - 1):
            callback(k + 1, n_iter)
        if tol and (k % 10 == 9):
            change = float((V - V_prev).abs().max())
            if change < tol:
                break
            V_prev.copy_(V)


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
        # the head's own distance scale: the layers' σ can be short (their graph term acts 100 times)
        self.raw_cell_sigma = nn.Parameter(
            torch.tensor(_inv_sigmoid_range(DEFAULTS.cell_sigma, lo, hi), dtype=torch.float32)
        )
        # layers at which per-entry weights are recomputed; None: one weight per gene
        self.refresh_layers: tuple[int, ...] | None = None

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
            w = edge_weights(graph, self.cell_sigma(), sigma_feature)
            deg = torch.zeros(c0.shape[0], dtype=c0.dtype, device=c0.device).index_add_(
                0, graph["rows"], w
            )
            c = c0
            for _ in range(CELL_SMOOTHING_STEPS):
                c = (c0 + alpha * _graph_product(graph, w, c)) / (1 + alpha * deg)[:, None]
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

    def gene_weights(self) -> torch.Tensor:
        return torch.exp(self.log_gene_weight.clamp(-3.0, 3.0))

    def ridge(self) -> torch.Tensor:
        """(rows, n_types): 2 λ3 w3² per layer row."""
        return 2 * self.lambdas()[:, 2:3] * torch.exp(2 * self.log_type_weight)[None, :]

    def gram(self, X, B: torch.Tensor, gene_scale: torch.Tensor):
        """``BtX`` (spots x types) and ``BtB`` with the (learned) gene weights applied.

        ``X`` is a dense tensor or a scipy sparse matrix (large slides stay sparse).
        """
        g2 = (gene_scale * self.gene_weights()) ** 2
        Bw = B * g2[:, None]
        if sp.issparse(X):
            BtX = torch.as_tensor(np.asarray(X @ Bw.detach().cpu().numpy()), device=B.device)
        else:
            BtX = X @ Bw
        return BtX, B.T @ Bw

    @property
    def entry_weights(self) -> bool:
        """Whether the data term uses per-entry (spot x gene) weights instead of gene weights."""
        return self.refresh_layers is not None

    def _entry_noise(self, noise):
        if noise is None:
            raise ValueError(
                "this model uses per-entry weights: pass noise=EntryNoise(library sizes, overdispersion)"
            )
        return noise

    def _graph_terms(self, graph: dict | None, V: torch.Tensor):
        """``(V -> A V, A 1)`` with the learned σ's (differentiable), or ``(None, None)``."""
        if graph is None:
            return None, None
        s = self.sigmas()
        w = edge_weights(graph, s[0], s[1])
        deg = torch.zeros(V.shape[0], dtype=V.dtype, device=V.device).index_add_(
            0, graph["rows"], w
        )
        return (lambda v: _graph_product(graph, w, v)), deg

    def forward(
        self, X, B, gene_scale, graph: dict | None = None, V0=None, noise: EntryNoise | None = None
    ) -> torch.Tensor:
        """Differentiable unrolled pass; returns mRNA fractions V (spots x types).

        ``noise``: library sizes and overdispersion, needed (only) by a per-entry-weights model;
        its weights are recomputed from the detached V, so gradients flow through the updates."""
        if self.entry_weights:
            return self._forward_entry(X, B, graph, V0, self._entry_noise(noise))
        BtX, BtB = self.gram(X, B, gene_scale)
        n, p = BtX.shape
        V = torch.full((n, p), 1.0 / p, dtype=BtX.dtype, device=BtX.device) if V0 is None else V0
        lam = self.lambdas()
        ridge = self.ridge()
        om = self.omega()
        gp, deg = self._graph_terms(graph, V)
        ones = torch.ones(p, p, dtype=BtX.dtype, device=BtX.device)
        with flush_denormals():
            for k in range(self.n_layers):
                r = 0 if self.tied else k
                if k == 0 or not self.tied:  # constants of this layer's parameters
                    C = BtX + lam[r, 1]
                    M = BtB + torch.diag(ridge[r]) + lam[r, 1] * ones
                    dcol = (lam[r, 0] * deg)[:, None] if gp is not None else None
                V = _fused_step(V, C, M, lam[r, 0], dcol, gp, om)
        return V

    def _forward_entry(self, X, B, graph, V0, noise: EntryNoise) -> torch.Tensor:
        n, p = X.shape[0], B.shape[1]
        dt = torch.float32 if not isinstance(X, torch.Tensor) else X.dtype
        V = torch.full((n, p), 1.0 / p, dtype=dt, device=B.device) if V0 is None else V0
        lam, ridge, om = self.lambdas(), self.ridge(), self.omega()
        gp, deg = self._graph_terms(graph, V)
        ones = torch.ones(p, p, dtype=V.dtype, device=V.device)
        refresh = set(self.refresh_layers) | {0}
        with flush_denormals():
            for k in range(self.n_layers):
                r = 0 if self.tied else k
                if k in refresh:
                    BtX, G = entry_weighted_gram(X, B, V, noise)
                M = torch.diag(ridge[r]) + lam[r, 1] * ones
                dcol = (lam[r, 0] * deg)[:, None] if gp is not None else None
                V = _entry_step(V, BtX, G, M, lam[r, 0], lam[r, 1], dcol, gp, om)
        return V

    @torch.no_grad()
    def _infer_entry(
        self, X, B, adjacency, noise: EntryNoise, l1, l2, ridge, n_iter, callback, omega
    ):
        """In-place inference with per-entry weights (scipy's CSR kernel for the graph)."""
        n, p = X.shape[0], B.shape[1]
        V = torch.full((n, p), 1.0 / p, dtype=torch.float32, device=B.device)
        A, deg = _inference_graph(adjacency, V.device, V.dtype)
        ridge_t = torch.as_tensor(ridge, device=V.device, dtype=V.dtype)
        ones = torch.ones(p, p, dtype=V.dtype, device=V.device)
        refresh = set(self.refresh_layers) | {0}
        num, den = torch.empty_like(V), torch.empty_like(V)
        with flush_denormals():
            for k in range(n_iter):
                l1k, l2k = _per_layer(l1, k), _per_layer(l2, k)
                r = ridge_t[k] if ridge_t.ndim == 2 else ridge_t
                if k in refresh:
                    BtX, G = entry_weighted_gram(X, B, V, noise)
                torch.add(BtX, l2k, out=num)
                if A is not None and l1k:
                    A.accumulate(V, num, l1k)
                gram_times(V, G, den)
                den.addmm_(V, torch.diag(r) + l2k * ones).add_(EPS)
                if A is not None and l1k:
                    den.addcmul_(V, deg, value=l1k)
                V.mul_(num.div_(den).pow_(omega))
                if callback is not None and (k % 10 == 9 or k == n_iter - 1):
                    callback(k + 1, n_iter)
        return V

    @torch.no_grad()
    def infer(
        self,
        X,
        B,
        gene_scale,
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
        if self.entry_weights:
            noise = self._entry_noise(noise)
        else:
            BtX, BtB = gram if gram is not None else self.gram(X, B, gene_scale)
        lam = self.lambdas().cpu().numpy().astype(np.float64)
        s = self.sigmas().cpu().numpy()
        adjacency = (
            None
            if graph is None or graph.n_edges == 0
            else graph.adjacency(float(s[0]), float(s[1]))
        )
        ridge = self.ridge().cpu().numpy()
        if self.tied:
            l1, l2, r = lam[0, 0], lam[0, 1], ridge[0]
        else:
            l1, l2, r = lam[:, 0], lam[:, 1], ridge
        omega = float(self.omega())
        while True:
            if self.entry_weights:
                V = self._infer_entry(
                    X, B, adjacency, noise, l1, l2, r, n_layers or self.n_layers, callback, omega
                )
            else:
                V = solve(
                    BtX,
                    BtB,
                    adjacency=adjacency,
                    lam1=l1,
                    lam2=l2,
                    ridge=r,
                    n_iter=n_layers or self.n_layers,
                    callback=callback,
                    omega=omega,
                )
            if _bounded(V) or omega <= 1.0:
                return V
            # parameters learned on crops of simulated slides can over-relax too far on spots
            # unlike any of them: halve the over-relaxation until the updates stay bounded
            damped = max(1.0, 1.0 + (omega - 1.0) / 2)
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
        gw = self.gene_weights().detach().cpu().numpy()
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
