"""Public API: predict a target network's variables for a dataset in one forward pass.

Two levels:

- ``make_predict_fn(config)`` returns the pure function
  ``predict(hyper_params, dataset_batch) -> {'params', 'batch_stats'}``. Its input is the
  preprocessed batch (float32 ``[N, H, W, C]`` at the target's input shape, normalised); it can be
  jitted, vmapped over a leading task axis and differentiated (meta-training does all three).
- ``load_predictor(path)`` returns a ``Predictor`` holding a trained hypernetwork. It takes raw
  images (uint8 or float, any size, 1 or 3 channels), preprocesses them as meta-training did, and
  checks its input (``pudnet_jax.validation``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pudnet_jax.hypernet import build_hypernet
from pudnet_jax.hypernet.chunked import chunked_apply
from pudnet_jax.models import get_target
from pudnet_jax.validation import check_dataset_batch, positive_int

Variables = dict[str, Any]


def make_predict_fn(config, num_classes: int | None = None, chunk_size: int | None = None,
                    canonical_row_order: bool = True) -> Callable[[Any, Mapping], Variables]:
    """Returns ``predict(hyper_params, dataset_batch) -> variables`` for ``config``.

    Args:
      config: the run's ``ConfigDict`` (``config.model``, ``config.hyper``).
      num_classes: classes of the predicted head; defaults to ``config.model.num_classes``.
        Labels must lie in ``0..num_classes-1``; every class with no (unmasked) example in the
        batch, e.g. those above the largest label, gets a logit bias of ``-1e9`` so it is never
        predicted.
      chunk_size: if set and the batch has more images, the encoder and the BatchNorm pass run
        ``chunk_size`` images at a time (``pudnet_jax.hypernet.chunked``): memory bounded by the
        chunk instead of the dataset, for about ``L/2`` times the target's forward compute
        (``L`` BatchNorm layers; with ``hyper.data_layers`` about ``L``, one more sweep per
        conv). Same result up to float summation order.
      canonical_row_order: sort the batch's rows first (``canonical_order``), so the result
        is the same to the last bit however the caller ordered them. ``False`` only to measure
        what row order does (``launch/row_order_check.py``).

    With ``config.hyper.mirror_support`` the batch is extended by the horizontal mirror image
    of every row (same label and mask) before the hypernetwork reads it: the BatchNorm
    statistics and the classifier's solve see twice the examples, at about twice predict's
    cost. Only for data whose classes survive a flip (``data.tasks.FLIP_PRESERVES_CLASS``:
    natural images, clothes; not signs, digits or characters).

    ``hyper_params`` is the hypernetwork's ``{'params': ...}``. ``dataset_batch`` is
    ``{'image': float32 [N, H, W, C], 'label': int [N], 'mask': bool [N] (optional)}``.
    """
    hypernet = build_hypernet(config, num_classes)
    image_shape = tuple(hypernet.image_shape)
    if chunk_size is not None:
        try:
            chunk_size = positive_int("chunk_size", chunk_size)
        except ValueError:
            raise ValueError(f"chunk_size must be a positive number of images or None; got {chunk_size!r}.") from None
    mirror = config.hyper.get("mirror_support", False)
    if not isinstance(mirror, bool):
        raise ValueError(f"hyper.mirror_support must be True or False; got {mirror!r}.")

    def predict(hyper_params, dataset_batch: Mapping) -> Variables:
        check_dataset_batch(dataset_batch, hypernet.num_classes, image_shape)
        images = jnp.asarray(dataset_batch["image"], jnp.float32)
        labels = jnp.asarray(dataset_batch["label"], jnp.int32)
        mask = dataset_batch.get("mask")
        mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask, bool)
        # Padding may hold anything, NaN included (its values are not checked): zero it once here
        # so that no later path (encoder, BatchNorm pass, chunked pass, classifier solve) has to
        # keep NaN out of its masked sums on its own (0 * NaN is NaN).
        images = jnp.where(mask[:, None, None, None], images, 0.0)
        if mirror:
            images, labels, mask = with_mirror_images(images, labels, mask)
        if canonical_row_order:  # after mirroring: predict on the extended set is one function of it
            images, labels, mask = canonical_order(images, labels, mask)
        if chunk_size is not None and images.shape[0] > chunk_size:
            return chunked_apply(hypernet, hyper_params, images, labels, mask, chunk_size)
        return hypernet.apply(hyper_params, images, labels, mask)

    return predict


def content_keys(images):
    """``[N]`` float32: one number per row from its pixels alone (a fixed pseudo-random
    projection), so equal images get equal keys wherever they sit in the batch."""
    size = int(np.prod(images.shape[1:]))
    # A fixed, well-spread projection (no PRNG key: it is a constant of the function, not a draw).
    weights = jnp.sin(jnp.arange(1, size + 1, dtype=jnp.float32) * 12.9898).reshape(images.shape[1:])
    return jnp.sum(images * weights, axis=tuple(range(1, images.ndim)))


def canonical_order(images, labels, mask):
    """The batch's rows sorted by (valid rows first, label, ``content_keys``).

    Why: predict is a function of the *set* of examples, but float sums over the batch (encoder
    pooling, class means, BatchNorm and patch statistics) depend on the order they are added in,
    and the discriminant data layers amplify that: shuffles of the same CIFAR-10 sample gave
    networks agreeing with the unshuffled one on as few as 91% of the test images (RESULTS.md
    section 4). Sorting first makes
    predict exactly invariant to how the caller ordered the rows (on a given machine and
    ``chunk_size``; other summation orders remain, see the troubleshooting notes).
    Rows with equal keys and labels are equal images (or a float coincidence), whose order
    does not matter.
    """
    order = jnp.lexsort((content_keys(images), labels, ~mask))
    return images[order], labels[order], mask[order]


def with_mirror_images(images, labels, mask):
    """``[N, H, W, C]`` images, labels, mask -> ``2N`` rows: the originals, then their
    horizontal mirror images (width axis reversed) with the same labels and mask."""
    mirrored = images[:, :, ::-1, :]
    return (jnp.concatenate([images, mirrored]), jnp.concatenate([labels, labels]),
            jnp.concatenate([mask, mask]))


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(hypernet, rng, images, labels, mask):
    # The module is a static argument: Flax modules are frozen dataclasses, equal (and equally
    # hashed) when built from equal configs, so every init of one architecture (a fresh train
    # state, the shape templates of each restore) reuses one trace instead of re-tracing the
    # whole hypernetwork (seconds per call on CPU).
    return hypernet.init(rng, images, labels, mask)


def init_hyper_params(config, rng, num_classes: int | None = None):
    """Initial hypernetwork variables (``{'params': ...}``) for ``config``."""
    hypernet = build_hypernet(config, num_classes)
    n = 2 * hypernet.num_classes
    images = jnp.zeros((n, *hypernet.image_shape), jnp.float32)
    labels = jnp.arange(n, dtype=jnp.int32) % hypernet.num_classes
    return _init_variables(hypernet, rng, images, labels, jnp.ones((n,), bool))


def preprocess_images(images, image_size: int, channels: int) -> np.ndarray:
    """Raw uint8/float ``[N, H, W, C]`` -> float32 ``[N, image_size, image_size, channels]`` in [0, 1].

    Float input must hold raw pixels in [0, 1] (values are standardised afterwards); NaN,
    infinite or out-of-range values raise ``ValueError``.
    """
    from pudnet_jax.data.preprocess import to_model_input  # data layer owns resizing

    images = np.asarray(images)
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 (0..255) or float (0..1); got dtype {images.dtype}.")
        images = np.asarray(images, np.float32)
        if images.size and not np.isfinite(images).all():
            raise ValueError("'image' contains NaN or infinite pixel values.")
        if images.size and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            # Clipping 0..255 floats (or standardised ones) to [0, 1] would silently give
            # near-constant images and meaningless parameters.
            raise ValueError(f"Float images must hold raw pixels in [0, 1]; got values in "
                             f"[{images.min():.4g}, {images.max():.4g}]. Pass uint8 0..255 images or "
                             "divide by 255; do not normalise them (the Predictor does).")
        images = np.clip(images, 0.0, 1.0)
        images = np.round(images * 255.0).astype(np.uint8)
    return to_model_input(images, image_size=image_size, channels=channels)


@dataclasses.dataclass
class Predictor:
    """A trained hypernetwork with its config: ``predict`` raw datasets, ``apply`` the result.

    ``predict`` returns the target's ``{'params', 'batch_stats'}`` plus a ``'preprocess'``
    collection holding the per-channel mean/std computed from the dataset batch;
    ``target.apply`` ignores it and ``Predictor.apply`` uses it to normalise new images the
    same way.
    """

    config: Any
    hyper_params: Any
    # Images per chunk for large dataset batches (memory bounded by the chunk; see make_predict_fn).
    chunk_size: int | None = None
    # Compiled functions per class count: one Predictor compiles each shape once.
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def image_size(self) -> int:
        return int(self.config.model.image_size)

    @property
    def channels(self) -> int:
        return int(self.config.model.channels)

    def target(self, num_classes: int):
        return get_target(self.config.model.target, num_classes)

    def predict(self, dataset_batch: Mapping) -> Variables:
        """Raw ``{'image', 'label', 'mask'?}`` -> variables for a ``num_classes = max label + 1`` head."""
        num_classes = check_dataset_batch(dataset_batch)
        raw = np.asarray(dataset_batch["image"])
        mask = dataset_batch.get("mask")
        valid = np.ones(len(raw), bool) if mask is None else np.asarray(mask, bool)
        # Padding rows may hold anything, as for the pure predict: zero them before the pixel
        # checks and the resize read them.
        raw = np.where(valid.reshape((-1,) + (1,) * (raw.ndim - 1)), raw, np.zeros((), raw.dtype))
        images = preprocess_images(raw, self.image_size, self.channels)
        mean = images[valid].mean(axis=(0, 1, 2))
        std = images[valid].std(axis=(0, 1, 2)) + 1e-3
        batch = {"image": (images - mean) / std,
                 "label": np.asarray(dataset_batch["label"], np.int32), "mask": valid}
        key = ("predict", num_classes, self.chunk_size)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(make_predict_fn(self.config, num_classes, self.chunk_size))
        variables = self._compiled[key](self.hyper_params, batch)
        return {**variables, "preprocess": {"mean": jnp.asarray(mean), "std": jnp.asarray(std)}}

    def apply(self, variables: Variables, images, batch_size: int = 1000) -> jax.Array:
        """Logits ``[N, K]`` of the predicted network on raw images (evaluated in chunks).

        ``variables`` must come from ``Predictor.predict`` (they carry the support's pixel
        statistics under 'preprocess', which raw images are standardised with).
        """
        if not isinstance(variables, Mapping) or not {"params", "batch_stats", "preprocess"} <= set(variables):
            keys = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
            raise ValueError("Predictor.apply needs the variables returned by Predictor.predict "
                             f"('params', 'batch_stats', 'preprocess'); got {keys}. Variables from "
                             "make_predict_fn lack 'preprocess': apply them with the target's own "
                             "apply on standardised images.")
        positive_int("Predictor.apply's batch_size", batch_size)
        num_classes = variables["params"]["Dense_0"]["bias"].shape[0]
        x = preprocess_images(images, self.image_size, self.channels)
        if len(x) == 0:
            raise ValueError("Predictor.apply got no images (N = 0).")
        pre = variables["preprocess"]
        x = (x - np.asarray(pre["mean"])) / np.asarray(pre["std"])
        target_vars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        self._check_fits_target(target_vars, num_classes)
        if ("apply", num_classes) not in self._compiled:
            target = self.target(num_classes)
            self._compiled["apply", num_classes] = jax.jit(
                lambda v, x: target.apply(v, x, train=False))
        apply_fn = self._compiled["apply", num_classes]
        return jnp.concatenate([apply_fn(target_vars, x[i:i + batch_size])
                                for i in range(0, len(x), batch_size)])


    def _check_fits_target(self, target_vars, num_classes: int) -> None:
        """``ValueError`` naming the first tensor that does not fit this predictor's target
        (variables predicted by another predictor: another target or input size)."""
        if ("shapes", num_classes) not in self._compiled:  # traced once per class count
            shape = (1, self.image_size, self.image_size, self.channels)
            expected = jax.eval_shape(lambda: self.target(num_classes).init(
                jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))
            self._compiled["shapes", num_classes] = {
                jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
        want = self._compiled["shapes", num_classes]
        got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(target_vars)}
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                raise ValueError(
                    f"These variables do not fit this predictor's {self.config.model.target} "
                    f"({self.image_size}x{self.image_size}x{self.channels} input): {key} is "
                    f"{got.get(key, 'missing')}, expected {want.get(key, 'absent')}. Apply them "
                    "with the Predictor that predicted them.")


def load_predictor(path: str | os.PathLike) -> Predictor:
    """Loads a trained hypernetwork from an exported directory or a training workdir.

    ``path`` is either an export (``config.json`` + ``hyper_params/``, as committed under
    ``checkpoints/``) or a training workdir (restores its best, else latest, checkpoint).

    Raises:
      FileNotFoundError: if ``path`` holds neither.
    """
    from pudnet_jax import checkpoints  # avoids importing Orbax for users of make_predict_fn only

    return checkpoints.load_predictor(path)
