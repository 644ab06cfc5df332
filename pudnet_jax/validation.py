"""Checks on user-supplied dataset batches, so bad input fails early with a message, not deep in XLA.

Shape and dtype checks work on tracers too (they are static); value checks (finite pixels, label
range, every class present) run only on concrete arrays, i.e. outside ``jax.jit``.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

EXPECTED_FORM = ("a dict {'image': [N, H, W, C] uint8 or float, 'label': [N] integer in 0..K-1, "
                 "'mask': optional [N] bool}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_dataset_batch(batch: Mapping, num_classes: int | None = None,
                        image_shape: tuple[int, ...] | None = None) -> int:
    """Validates a dataset batch and returns its class count: ``num_classes`` when given, else
    ``K`` = largest label + 1 (under ``jax.jit``, where labels are traced, ``num_classes or 0``).

    Args:
      batch: ``{'image', 'label', 'mask'?}``, see ``EXPECTED_FORM``.
      num_classes: if given, labels must lie in ``0..num_classes-1``.
      image_shape: if given, images must be float and exactly ``[N, *image_shape]`` (the
        preprocessed input of the jitted predict function); otherwise uint8 or float images of
        any ``H, W`` and ``C`` in {1, 3} are accepted.

    Raises:
      ValueError: naming the problem and the expected form.
    """
    if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
        raise ValueError(f"Dataset batch must be {EXPECTED_FORM}; got {type(batch).__name__} "
                         f"with keys {sorted(batch) if isinstance(batch, Mapping) else 'n/a'}.")
    # Lists and other array-likes are checked as the arrays they convert to.
    images, labels, mask = (x if x is None or hasattr(x, "dtype") else np.asarray(x)
                            for x in (batch["image"], batch["label"], batch.get("mask")))
    shape = tuple(np.shape(images))
    if len(shape) != 4:
        raise ValueError(f"'image' must have rank 4 [N, H, W, C]; got shape {shape}. "
                         "Add a channel axis to grayscale images (x[..., None]).")
    n, h, w, c = shape
    if n == 0:
        raise ValueError("The dataset batch is empty (N = 0 images).")
    if h < 1 or w < 1:
        raise ValueError(f"'image' must be at least 1x1 pixels; got shape {shape}.")
    if image_shape is not None and shape[1:] != tuple(image_shape):
        raise ValueError(f"'image' must have shape [N, {', '.join(map(str, image_shape))}] "
                         f"(preprocessed target input); got {shape}.")
    if c not in (1, 3):
        raise ValueError(f"'image' has {c} channels; expected 1 (grayscale) or 3 (RGB).")
    dtype = np.dtype(images.dtype)
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"'image' dtype must be uint8 or floating; got {dtype}.")
    if image_shape is not None and not np.issubdtype(dtype, np.floating):
        # The predict fn reads standardised float input; uint8 0..255 pixels would be read as
        # values 100x too large and give meaningless parameters without any error.
        raise ValueError(f"'image' must be float (preprocessed and standardised target input) for "
                         f"the predict fn; got {dtype}. Use the Predictor for raw uint8 images, or "
                         "data.to_model_input + data.normalize first.")
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise ValueError(f"'label' must be an integer array; got dtype {labels.dtype}. "
                         "Convert class ids with labels.astype(np.int32).")
    if tuple(np.shape(labels)) != (n,):
        raise ValueError(f"'label' must have shape [N] = [{n}] to match 'image'; got {np.shape(labels)}.")
    if mask is not None:
        if tuple(np.shape(mask)) != (n,):
            raise ValueError(f"'mask' must have shape [N] = [{n}]; got {np.shape(mask)}.")
        if np.dtype(mask.dtype) != np.bool_:
            raise ValueError(f"'mask' must be boolean; got dtype {mask.dtype}.")

    if not all(_is_concrete(x) for x in (images, labels, mask) if x is not None):
        return int(num_classes or 0)
    valid = np.ones(n, bool) if mask is None else np.asarray(mask)
    if not valid.any():
        raise ValueError("Every row of the dataset batch is masked out (mask is all False).")
    if np.issubdtype(dtype, np.floating) and not np.isfinite(np.asarray(images)[valid]).all():
        raise ValueError("'image' contains NaN or infinite pixel values.")
    labels_np = np.asarray(labels)[valid]
    if labels_np.min() < 0:
        raise ValueError(f"'label' has negative values (min {labels_np.min()}); expected 0..K-1.")
    k = int(labels_np.max()) + 1
    if num_classes is not None and k > num_classes:
        raise ValueError(f"'label' has values up to {k - 1} but the predictor was built for "
                         f"{num_classes} classes (labels 0..{num_classes - 1}).")
    present = np.unique(labels_np)  # not bincount: a stray huge label must not allocate k counts
    # The first 10 missing classes lie below len(present) + 10 (pigeonhole).
    missing = np.setdiff1d(np.arange(min(k, len(present) + 10)), present)
    if len(present) < k:
        raise ValueError(f"Classes {missing.tolist()[:10]} have no example in the batch; labels must "
                         f"cover 0..K-1 without gaps (remap them, e.g. np.unique(y, return_inverse=True)).")
    return int(num_classes or k)


def positive_int(name: str, value) -> int:
    """``value`` as an ``int`` if it is a whole number >= 1 (not a bool), else ``ValueError``
    naming ``name``: a config field or argument that counts something."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)
