"""The sparse graph equals a dense reference and behaves on real layouts."""

import numpy as np
import pytest
import scipy.sparse as sp

from napari_stlnmf.datasets import hex_layout, tissue_image
from napari_stlnmf.errors import CoordinateError, ImageMismatchError
from napari_stlnmf.graph import build_graph, region_features, spot_image_features, spot_spacing


def dense_reference(xy, features, sigma_d, sigma_f, n_neighbors, max_distance):
    """Brute-force O(n^2) construction of the same operator."""
    n = len(xy)
    D = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    spacing = np.median(np.sort(D, 1)[:, 1])
    A = np.zeros((n, n))
    for i in range(n):
        order = np.argsort(D[i], kind="stable")[1 : n_neighbors + 1]
        for j in order:
            if D[i, j] / spacing <= max_distance:
                A[i, j] = A[j, i] = 1
    f = (features - features.mean(0)) / features.std(0)
    Z = np.linalg.norm(f[:, None] - f[None], axis=2) / np.sqrt(f.shape[1])
    W = np.exp(-((D / spacing) ** 2) / sigma_d**2 - Z**2 / sigma_f**2)
    return A * W


def test_sparse_graph_equals_dense_reference(rng):
    xy = hex_layout(6, 7, pitch=10.0)
    xy = xy + rng.normal(scale=0.01, size=xy.shape)  # break distance ties
    features = rng.normal(size=(len(xy), 4))
    g = build_graph(xy, n_neighbors=6, max_distance=1.5, features=features)
    A = g.adjacency(0.8, 1.3).toarray()
    expected = dense_reference(xy, features, 0.8, 1.3, 6, 1.5)
    np.testing.assert_allclose(A, expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(A, A.T)
    assert sp.issparse(g.adjacency(1.0))


def test_hexagonal_lattice_has_six_neighbours():
    xy = hex_layout(12, 12, pitch=100.0)
    g = build_graph(xy)
    deg = np.bincount(g.rows, minlength=g.n_spots)
    interior = (
        (xy[:, 0] > xy[:, 0].min() + 150)
        & (xy[:, 0] < xy[:, 0].max() - 150)
        & (xy[:, 1] > xy[:, 1].min() + 150)
        & (xy[:, 1] < xy[:, 1].max() - 150)
    )
    assert (deg[interior] == 6).all()
    assert g.spacing == pytest.approx(100.0)
    np.testing.assert_allclose(g.distance, 1.0, rtol=1e-5)


def test_square_lattice_keeps_tied_neighbours():
    """With ``keep_ties`` (Visium HD bins) a square lattice gets its whole ring: 6 or 8
    neighbours give the 8-ring, 4 the sides; without it 6 picks 2 of the 4 diagonals."""
    rows, cols = np.divmod(np.arange(20 * 20), 20)
    xy = np.column_stack([cols, rows]) * 29.2 + 1000.0
    interior = (rows > 2) & (rows < 17) & (cols > 2) & (cols < 17)
    for n_neighbors, ring in ((4, 4), (6, 8), (8, 8)):
        g = build_graph(xy, n_neighbors=n_neighbors, keep_ties=True, spacing=29.2)
        assert (np.bincount(g.rows, minlength=g.n_spots)[interior] == ring).all()
        assert g.spacing == 29.2
    plain = np.bincount(build_graph(xy, n_neighbors=6).rows)[interior]
    assert plain.min() < 8  # the arbitrary half of the diagonals
    hexagonal = build_graph(hex_layout(10, 10), keep_ties=True)
    assert hexagonal.n_edges == build_graph(hex_layout(10, 10)).n_edges  # no ties there


def test_border_spots_do_not_link_to_far_spots():
    xy = np.vstack([hex_layout(5, 5, pitch=1.0), [[100.0, 100.0]]])
    g = build_graph(xy)
    assert not ((g.rows == len(xy) - 1) | (g.cols == len(xy) - 1)).any()


def test_subgraph_keeps_internal_edges():
    g = build_graph(hex_layout(8, 8))
    idx = np.arange(20)
    sub = g.subgraph(idx)
    full = g.adjacency(1.0).toarray()[np.ix_(idx, idx)]
    np.testing.assert_allclose(sub.adjacency(1.0).toarray(), full)


def test_image_features_see_tissue_and_background():
    img = tissue_image(200)
    xy_in = np.array([[100.0, 100.0]])
    xy_out = np.array([[3.0, 3.0]])
    f_in = spot_image_features(img, xy_in, 4)
    f_out = spot_image_features(img, xy_out, 4)
    assert f_in.shape == (1, 4)
    assert f_out[0, :3].mean() > f_in[0, :3].mean()  # background is brighter than tissue


def test_region_labels_cut_edges_between_regions():
    xy = hex_layout(6, 6, pitch=1.0)
    labels = (xy[:, 0] > np.median(xy[:, 0])).astype(int)
    g = build_graph(xy, features=region_features(labels))
    w = g.weights(1.0, 0.5)
    across = labels[g.rows] != labels[g.cols]
    assert across.any() and (~across).any()
    assert w[across].max() < w[~across].min()


def test_bad_coordinates_raise():
    with pytest.raises(CoordinateError, match="NaN"):
        build_graph(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    with pytest.raises(CoordinateError, match="shape"):
        build_graph(np.zeros(5))
    with pytest.raises(ImageMismatchError, match="features for 2 spots"):
        build_graph(hex_layout(3, 3), features=np.zeros((2, 3)))
    with pytest.raises(CoordinateError, match="share their coordinates"):
        spot_spacing(np.zeros((10, 2)))
