"""Stage 1's OpenCV filters and shortcuts give scipy.ndimage's and NumPy's results (pure logic, no services)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from services.nodule.candidates import (
    _ellipsoid,
    _indices_of,
    binary_dilation,
    binary_erosion,
    distance_to_region,
    fill_holes,
    gaussian_filter,
    maximum_filter_3,
)

SHAPES = [(1, 6, 7), (2, 9, 9), (5, 20, 21), (24, 48, 50)]
"""Down to one slice, and kernels wider than an axis (reflected more than once)."""


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigma", [0.8, 1.34, 3.35, 6.0])
def test_the_gaussian_is_scipys_within_float32_rounding(shape: tuple[int, int, int], sigma: float) -> None:
    volume = (np.random.default_rng(0).normal(size=shape) * 300).astype(np.float32)
    expected = ndimage.gaussian_filter(volume, sigma, truncate=3.0)
    assert np.abs(gaussian_filter(volume, sigma) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("shape", SHAPES)
def test_the_maximum_filter_is_scipys_exactly(shape: tuple[int, int, int]) -> None:
    volume = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    assert np.array_equal(maximum_filter_3(volume), ndimage.maximum_filter(volume, size=3, mode="nearest"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("radius", [(1, 1, 1), (2, 2, 2), (1, 3, 3), (3, 2, 2)])
def test_dilation_erosion_and_closing_are_scipys_exactly(shape: tuple[int, int, int],
                                                         radius: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(2)
    ball = _ellipsoid(np.asarray(radius))
    sparse, dense = rng.random(shape) < 0.3, rng.random(shape) < 0.8
    assert np.array_equal(binary_dilation(sparse, ball), ndimage.binary_dilation(sparse, structure=ball))
    assert np.array_equal(binary_erosion(dense, ball), ndimage.binary_erosion(dense, structure=ball, border_value=0))
    assert np.array_equal(binary_erosion(binary_dilation(sparse, ball), ball),
                          ndimage.binary_closing(sparse, structure=ball, border_value=0))


@pytest.mark.parametrize("fill", [0.02, 0.3, 0.9, 1.0])
def test_distance_to_the_region_is_the_distance_transforms_at_the_points(fill: float) -> None:
    rng = np.random.default_rng(3)
    region = ndimage.binary_dilation(rng.random((12, 30, 31)) < fill / 10, iterations=2) if fill < 1 else \
        np.ones((12, 30, 31), bool)
    points = np.argwhere(np.ones(region.shape, bool))
    expected = ndimage.distance_transform_edt(~region)[points[:, 0], points[:, 1], points[:, 2]]
    assert np.array_equal(distance_to_region(region, points), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fill", [0.3, 0.55, 0.75])
def test_holes_are_filled_as_scipy_fills_them(shape: tuple[int, int, int], fill: float) -> None:
    rng = np.random.default_rng(4)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    for structure in (in_plane, ndimage.generate_binary_structure(3, 1), np.ones((3, 3, 3), bool)):
        mask = rng.random(shape) < fill
        assert np.array_equal(fill_holes(mask, structure), ndimage.binary_fill_holes(mask, structure=structure))


def test_the_indices_of_a_mask_are_argwheres() -> None:
    for fill in (0.0, 0.01, 0.5, 1.0):
        mask = np.random.default_rng(5).random((7, 11, 13)) < fill
        assert np.array_equal(_indices_of(mask), np.argwhere(mask))


@pytest.mark.parametrize("limit", [0.0, 1.0, 2.5, 6.0])
def test_distances_within_the_limit_are_exact_and_the_rest_infinite(limit: float) -> None:
    rng = np.random.default_rng(4)
    region = ndimage.binary_dilation(rng.random((12, 30, 31)) < 0.002, iterations=2)
    points = np.argwhere(np.ones(region.shape, bool))
    expected = ndimage.distance_transform_edt(~region)[points[:, 0], points[:, 1], points[:, 2]]
    found = distance_to_region(region, points, limit=limit)
    assert np.array_equal(found[expected <= limit], expected[expected <= limit])
    assert np.isinf(found[expected > limit]).all()


def test_spreading_the_filters_over_the_cores_changes_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    volume = (np.random.default_rng(5).normal(size=(40, 70, 90)) * 300).astype(np.float32)
    spread = gaussian_filter(volume, 1.34), maximum_filter_3(volume)
    monkeypatch.setattr("shared.parallel.cores", lambda: 1)
    assert np.array_equal(spread[0], gaussian_filter(volume, 1.34))
    assert np.array_equal(spread[1], maximum_filter_3(volume))
