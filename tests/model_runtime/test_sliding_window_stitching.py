"""Stitching without torch's intra-op threads: a grid's weights computed once and shared read-only,
the blend equal to MONAI's arithmetic, patch outputs of any float dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map

from model_runtime.sliding_window import SlidingWindowConfig, Stitcher, plan_study, to_host_via_pinned

CONFIG = SlidingWindowConfig(roi_size=(8, 8, 8), overlap=0.5, mode="gaussian")


def test_studies_of_one_shape_share_their_read_only_weights() -> None:
    first, second = plan_study(torch.randn(1, 20, 12, 9), CONFIG), plan_study(torch.randn(1, 20, 12, 9), CONFIG)
    assert first.weight_sum is second.weight_sum and first.weights is second.weights
    assert not first.weight_sum.flags.writeable and not first.weights.flags.writeable
    other = plan_study(torch.randn(1, 16, 12, 9), CONFIG)
    assert other.weight_sum.shape == (16, 12, 9)
    expected_map = compute_importance_map((8, 8, 8), mode="gaussian", sigma_scale=0.125, device="cpu")
    torch.testing.assert_close(torch.from_numpy(np.array(first.weights)), expected_map.float())


def test_stitched_sum_is_the_weighted_mean_of_the_patches() -> None:
    plan = plan_study(torch.randn(1, 20, 12, 9), CONFIG)
    stitcher = Stitcher(plan)
    outputs = [torch.randn(2, 8, 8, 8, dtype=torch.float64) for _ in plan.windows]
    for index, output in enumerate(outputs):
        stitcher.add(index, output)
    blended = stitcher.finish()
    assert isinstance(blended, torch.Tensor) and blended.dtype == torch.float32 and blended.shape == (2, 20, 12, 9)
    weights = torch.from_numpy(np.array(plan.weights)).double()
    numerator = torch.zeros(2, 20, 12, 9, dtype=torch.float64)
    for window, output in zip(plan.windows, outputs, strict=True):
        numerator[(slice(None), *window)] += output * weights
    expected = numerator / torch.from_numpy(np.array(plan.weight_sum)).double()
    torch.testing.assert_close(blended.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_patch_output_whose_channels_change_is_refused() -> None:
    plan = plan_study(torch.randn(1, 20, 12, 9), CONFIG)
    stitcher = Stitcher(plan)
    stitcher.add(0, torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        stitcher.add(1, torch.randn(3, 8, 8, 8))


def test_the_copy_to_the_host_falls_back_to_pageable_memory_where_pinned_memory_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("cudaHostAlloc failed: out of memory")

    monkeypatch.setattr(torch, "empty", refuse)
    values = torch.arange(6.0).reshape(2, 3)
    copied = to_host_via_pinned(values)
    assert copied.device.type == "cpu" and torch.equal(copied, values)


def test_a_grids_weights_are_copied_to_a_device_once_and_the_least_recently_used_dropped() -> None:
    from model_runtime.sliding_window import _DeviceWeightCache

    cache = _DeviceWeightCache(size=2)
    grids = [(np.full((2, 2), float(i), dtype=np.float32), np.full((4, 4), float(i), dtype=np.float32))
             for i in range(3)]
    device = torch.device("cpu")
    first = cache.get(*grids[0], device)
    assert cache.get(*grids[0], device)[0] is first[0]  # the same tensors: no second copy
    torch.testing.assert_close(first[1], torch.from_numpy(grids[0][1]))
    cache.get(*grids[1], device)
    cache.get(*grids[0], device)  # grid 0 used again: grid 1 is now the least recently used
    cache.get(*grids[2], device)
    assert cache.get(*grids[0], device)[0] is first[0]
    assert len(cache._entries) == 2 and (id(grids[1][0]), id(grids[1][1]), device) not in cache._entries
