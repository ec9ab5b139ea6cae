"""The classic (fixed λ) and unrolled (learned) solvers behind one interface.

A pipeline builds the :class:`FitInputs` of a slide once, picks a solver and calls
``solver.run(inputs, callback=...)``; the :class:`Fit` it gets back holds the mRNA fractions and
what the fit error needs, ``solver.describe()`` the parameters for reports and
``solver.cell_fractions(...)`` the conversion to cell fractions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .graph import SpatialGraph
from .model import DEFAULTS, UnrolledNMF, to_cell_fractions
from .updates import EntryNoise, normal_equations, solve

__all__ = ["ClassicSolver", "Fit", "FitInputs", "Solver", "UnrolledSolver"]

CLASSIC_MAX_ITER = 1000
CLASSIC_TOL = 1e-5


@dataclass(frozen=True)
class FitInputs:
    """One slide's problem: scaled counts ``X`` (spots x genes, scipy sparse or a tensor), the
    signatures ``B`` (genes x types, a tensor on the device to fit on), the per-gene weights, the
    spot graph (or None) and, for per-entry weights, the slide's :class:`EntryNoise`."""

    X: object
    B: torch.Tensor
    gene_weights: torch.Tensor
    graph: SpatialGraph | None = None
    noise: EntryNoise | None = None

    @property
    def device(self) -> torch.device:
        return self.B.device


@dataclass(frozen=True)
class Fit:
    """A solver's result: mRNA fractions ``V`` (spots x types, rows not yet normalised), the
    per-gene weights its data term used and the gene-weighted ``BtX``, ``BtB`` (for the fit
    error)."""

    V: torch.Tensor
    gene_weights: torch.Tensor
    BtX: torch.Tensor
    BtB: torch.Tensor


class Solver(Protocol):
    @property
    def n_layers(self) -> int:
        """Updates the solver runs at most (what its progress counts)."""
        ...

    def run(self, inputs: FitInputs, *, callback=None) -> Fit:
        """Fit the slide; ``callback(i, n)`` reports progress (and may raise to cancel)."""
        ...

    def describe(self) -> dict:
        """The parameters used, as plain numbers (for reports and ``uns``)."""
        ...

    def cell_fractions(self, V, mrna_content, graph: SpatialGraph | None) -> np.ndarray:
        """Cell fractions from the mRNA fractions ``V`` (an array)."""
        ...


@dataclass(frozen=True)
class ClassicSolver:
    """Multiplicative updates with hand-set parameters until V changes by less than ``tol``."""

    lambda_graph: float = DEFAULTS.lambda_graph
    lambda_sum: float = DEFAULTS.lambda_sum
    lambda_ridge: float = DEFAULTS.lambda_ridge
    sigma_distance: float = DEFAULTS.sigma_distance
    sigma_feature: float = DEFAULTS.sigma_feature
    max_iter: int = CLASSIC_MAX_ITER
    tol: float = CLASSIC_TOL

    @property
    def n_layers(self) -> int:
        return self.max_iter

    def run(self, inputs: FitInputs, *, callback=None) -> Fit:
        BtX, BtB = normal_equations(inputs.X, inputs.B, inputs.gene_weights**2)
        graph = inputs.graph
        adjacency = (
            None if graph is None else graph.adjacency(self.sigma_distance, self.sigma_feature)
        )
        p = inputs.B.shape[1]
        V = solve(
            BtX,
            BtB,
            adjacency=adjacency,
            lam1=self.lambda_graph,
            lam2=self.lambda_sum,
            ridge=torch.full((p,), 2 * self.lambda_ridge, device=inputs.device),
            n_iter=self.max_iter,
            tol=self.tol,
            callback=callback,
        )
        return Fit(V, inputs.gene_weights, BtX, BtB)

    def describe(self) -> dict:
        return {
            "lambda_graph": self.lambda_graph,
            "lambda_sum": self.lambda_sum,
            "lambda_ridge": self.lambda_ridge,
            "sigma_distance": self.sigma_distance,
            "sigma_feature": self.sigma_feature,
            "max_iter": self.max_iter,
        }

    def cell_fractions(self, V, mrna_content, graph=None) -> np.ndarray:
        return to_cell_fractions(V, mrna_content)


@dataclass(frozen=True)
class UnrolledSolver:
    """The unrolled network's in-place inference with its learned parameters (and, for a
    per-entry-weights model, the inputs' :class:`EntryNoise`)."""

    model: UnrolledNMF

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    def run(self, inputs: FitInputs, *, callback=None) -> Fit:
        model = self.model
        with torch.no_grad():
            gram = model.gram(inputs.X, inputs.B, inputs.gene_weights)
            V = model.infer(
                inputs.X,
                inputs.B,
                inputs.gene_weights,
                inputs.graph,
                callback=callback,
                gram=gram,
                noise=inputs.noise,
            )
            gene_weights = inputs.gene_weights * model.learned_gene_weights()
        return Fit(V, gene_weights, *gram)

    def describe(self) -> dict:
        return self.model.describe()

    def cell_fractions(self, V, mrna_content, graph=None) -> np.ndarray:
        return self.model.cell_fractions(V, mrna_content, graph)
