"""The one distance function (utils.distance.pairwise_distance) against direct computations."""
import pytest
import torch

from torchreid_vi.utils.distance import pairwise_distance


@pytest.fixture()
def rows():
    g = torch.Generator().manual_seed(0)
    # rows of very different norms, so that a missing normalisation or sqrt shows
    scale = torch.tensor([[0.1], [1], [3], [10], [0.5]], dtype=torch.float64)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64) * scale
    b = torch.randn(4, 7, generator=g, dtype=torch.float64) * 4
    return a, b


def test_euclidean_and_squared_euclidean_equal_cdist(rows):
    a, b = rows
    expected = torch.cdist(a, b)
    assert torch.allclose(pairwise_distance(a, b, 'euclidean'), expected, atol=1e-10)
    assert torch.allclose(pairwise_distance(a, b, 'sqeuclidean'), expected ** 2, atol=1e-9)


def test_cosine_is_one_minus_the_cosine_of_unnormalised_rows(rows):
    a, b = rows
    expected = torch.tensor([[1 - float(torch.dot(x, y) / (x.norm() * y.norm())) for y in b]
                             for x in a], dtype=torch.float64)
    assert torch.allclose(pairwise_distance(a, b, 'cosine'), expected, atol=1e-12)


def test_normalize_makes_euclidean_the_distance_of_unit_rows(rows):
    a, b = rows
    expected = torch.cdist(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True))
    assert torch.allclose(pairwise_distance(a, b, 'euclidean', normalize=True), expected,
                          atol=1e-10)


def test_half_precision_rows_give_float32_distances_and_unknown_metrics_fail(rows):
    a, b = rows
    d = pairwise_distance(a.half(), b.bfloat16(), 'euclidean')
    assert d.dtype == torch.float32
    assert torch.allclose(d.double(), torch.cdist(a, b), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="manhattan"):
        pairwise_distance(a, b, 'manhattan')
