"""Collating variable-length items into one batch, and splitting a batch's outputs back per item.

A ``run_batch`` over variable-length inputs (token ids, audio samples, sensor windows, volumes)
pads each named input to the batch's largest size along its declared axes and passes the mask to
the model::

    batch = collate(items, pad_axes={"audio": (0,), "tokens": (0,)})
    outputs = model(audio=batch.inputs["audio"], audio_mask=batch.masks["audio"], ...)
    return split_outputs(outputs, len(items), trim={"frames": ((0,), batch.sizes["audio"])})

Items are dicts of named arrays (torch tensors or numpy arrays, one kind per name) without the
batch axis; a mask is ``True`` where a value is real and ``False`` where it is padding, shaped
``(batch, *padded sizes along the declared axes)``. :func:`length_bucket` groups similar lengths
(``ModelSpec.bucket``) so padding stays small.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_runtime.lazy_torch import is_tensor, is_torch_module

Array = Any  # torch.Tensor or numpy.ndarray
Sizes = tuple[int, ...]


@dataclass
class Collated:
    """A padded batch of named inputs.

    Attributes
    ----------
    inputs : dict
        ``{name: array of shape (batch, ...)}``, padded along the declared axes.
    masks : dict
        ``{name: bool array (batch, *padded sizes)}`` for every padded name.
    sizes : dict
        ``{name: [per item, its sizes along the padded axes]}``, to trim outputs back.
    """

    inputs: dict[str, Array]
    masks: dict[str, Array] = field(default_factory=dict)
    sizes: dict[str, list[Sizes]] = field(default_factory=dict)


def pad_stack(arrays: Sequence[Array], axes: Sequence[int] = (0,), pad_value: float = 0) -> tuple[Array, Array]:
    """Stack ``arrays`` (same rank, sizes differing only along ``axes``) padded to the largest.

    Parameters
    ----------
    arrays : sequence of torch.Tensor or numpy.ndarray
        One per item, without the batch axis.
    axes : sequence of int
        Axes (of one item) along which sizes may differ.
    pad_value : float
        Value of the padding.

    Returns
    -------
    (batch, mask)
        ``batch`` of shape ``(N, *largest shape)``; ``mask`` (bool) of shape
        ``(N, *largest sizes along axes)``, ``True`` on real positions.
    """
    if not arrays:
        raise ValueError("nothing to stack")
    first = arrays[0]
    rank = first.ndim
    axes = tuple(axis % rank for axis in axes) if rank else ()
    for array in arrays:
        fixed = [size for axis, size in enumerate(array.shape) if axis not in axes]
        if array.ndim != rank or fixed != [size for axis, size in enumerate(first.shape) if axis not in axes]:
            raise ValueError(f"shapes {tuple(first.shape)} and {tuple(array.shape)} differ outside axes {axes}")
    largest = tuple(max(int(array.shape[axis]) for array in arrays) for axis in range(rank))
    mask_shape = (len(arrays), *(largest[axis] for axis in axes))
    batch: Array
    mask: Array
    if is_tensor(first):
        import torch

        batch = torch.full((len(arrays), *largest), pad_value, dtype=first.dtype, device=first.device)
        mask = torch.zeros(mask_shape, dtype=torch.bool, device=first.device)
    else:
        batch = np.full((len(arrays), *largest), pad_value, dtype=first.dtype)
        mask = np.zeros(mask_shape, dtype=bool)
    for row, array in enumerate(arrays):
        batch[(row, *(slice(0, size) for size in array.shape))] = array
        mask[(row, *(slice(0, int(array.shape[axis])) for axis in axes))] = True
    return batch, mask


def collate(items: Sequence[Mapping[str, Array]], pad_axes: Mapping[str, Sequence[int]] | None = None,
            pad_values: Mapping[str, float] | None = None) -> Collated:
    """Batch items that are dicts of named arrays; names in ``pad_axes`` are padded and masked.

    Names not in ``pad_axes`` must have the same shape in every item (they are stacked).
    """
    if not items:
        raise ValueError("nothing to collate")
    pad_axes = pad_axes or {}
    collated = Collated(inputs={})
    for name in items[0]:
        arrays = [item[name] for item in items]
        if name in pad_axes:
            axes = tuple(pad_axes[name])
            collated.inputs[name], collated.masks[name] = pad_stack(arrays, axes, (pad_values or {}).get(name, 0))
            collated.sizes[name] = [tuple(int(array.shape[axis]) for axis in axes) for array in arrays]
        else:
            collated.inputs[name], _ = pad_stack(arrays, ())
    return collated


def split_outputs(outputs: Array | Mapping[str, Array], count: int,
                  trim: Mapping[str, tuple[Sequence[int], Sequence[Sizes]]] | None = None) -> list[Any]:
    """One output per item out of a batched output (an array, or a dict of named arrays).

    Parameters
    ----------
    outputs : array or dict of arrays
        Each of shape ``(count, ...)``.
    count : int
        Items in the batch.
    trim : dict, optional
        ``{name: (axes, sizes per item)}``: cut a padded output back to each item's own sizes
        along ``axes`` (of one item), e.g. ``((0,), collated.sizes["audio"])``. For a single
        array, use the name ``""``.

    Returns
    -------
    list
        ``count`` arrays, or ``count`` dicts ``{name: array}``.
    """
    trim = trim or {}
    if isinstance(outputs, Mapping):
        named = {name: _split_one(value, count, trim.get(name)) for name, value in outputs.items()}
        return [{name: rows[index] for name, rows in named.items()} for index in range(count)]
    return _split_one(outputs, count, trim.get(""))


def _split_one(batch: Array, count: int, trim: tuple[Sequence[int], Sequence[Sizes]] | None) -> list[Array]:
    if len(batch) != count:
        raise ValueError(f"a batched output of {len(batch)} rows for {count} items")
    rows = [batch[index] for index in range(count)]
    if trim is None:
        return rows
    axes, sizes = trim
    return [row[tuple(slice(0, sizes[index][axes.index(axis)]) if axis in axes else slice(None)
                      for axis in range(row.ndim))] for index, row in enumerate(rows)]


def length_bucket(length_of: Callable[[Any], int], base: float = 2.0) -> Callable[[Any], int]:
    """A ``ModelSpec.bucket``: items whose lengths lie within a factor ``base`` batch together.

    Padding then wastes less than ``1 - 1/base`` of a batch (half at ``base=2``).
    """
    if base <= 1:
        raise ValueError("base must be > 1")

    def bucket(item: Any) -> int:
        return math.floor(math.log(max(1, length_of(item)), base))

    return bucket


def run_collated(pad_axes: Mapping[str, Sequence[int]], *, trim: Mapping[str, str] | None = None,
                 mask_suffix: str = "_mask", pad_values: Mapping[str, float] | None = None
                 ) -> Callable[[Any, list[Any]], list[Any]]:
    """A ``ModelSpec.run_batch`` for items that are dicts of named arrays.

    It collates the items (:func:`collate`), adds each padded input's mask as ``<name><mask_suffix>``,
    calls the model (a ``torch.nn.Module`` with the names as keyword arguments, or a backend called
    with the mapping) and splits its output(s) per item.

    Parameters
    ----------
    pad_axes : dict
        ``{input name: axes}`` that vary in length between items.
    trim : dict, optional
        ``{output name: input name}``: cut that output back to the input's sizes, along the same
        axes (e.g. per-frame outputs of a variable-length audio input).
    """
    trim = trim or {}

    def run_batch(model: Any, items: list[Any]) -> list[Any]:
        batch = collate(items, pad_axes, pad_values)
        named = {**batch.inputs, **{name + mask_suffix: mask for name, mask in batch.masks.items()}}
        outputs = model(**named) if is_torch_module(model) else model(named)
        cuts = {output: (tuple(pad_axes[source]), batch.sizes[source]) for output, source in trim.items()}
        return split_outputs(outputs, len(items), trim=cuts)

    return run_batch
