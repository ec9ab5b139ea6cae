import numpy as np
import pytest

from napari_stlnmf import metrics


def test_metrics_known_values():
    truth = np.array([[1.0, 0.0], [0.5, 0.5]])
    est = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert metrics.rmse(est, truth) == pytest.approx(np.sqrt(0.5 / 4))
    assert metrics.jensen_shannon(truth, truth) == pytest.approx([0, 0], abs=1e-12)
    js = metrics.jensen_shannon(est, truth)
    # by hand: p=(1,0), q=(.5,.5), m=(.75,.25)
    expected = 0.5 * np.log(1 / 0.75) + 0.5 * (0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25))
    assert js[0] == pytest.approx(expected)
    assert 0 < js[0] <= np.log(2) and js[1] == pytest.approx(0, abs=1e-12)
    assert metrics.relative_frobenius_error(est, truth) == pytest.approx(
        np.linalg.norm(est - truth) / np.linalg.norm(truth)
    )
    a = np.array([[0.1, 0.9], [0.4, 0.6], [0.8, 0.2]])
    b = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    r = metrics.pearson_per_type(a, b)
    assert r == pytest.approx([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(2)])
    assert np.isnan(metrics.pearson_per_type(np.ones((3, 1)), b[:, :1])[0])
    with pytest.raises(ValueError, match="shape"):
        metrics.rmse(est, truth[:1])
