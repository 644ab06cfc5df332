"""Auxiliary supervised loss over the pooled source classes (``config.train.source_loss_weight``).

Episodic meta-training asks a predicted backbone only to tell apart the K classes of its own task
(the classifier is solved per task). A supervised network trained on all the sources' classes at
once learns features that transfer further (RESULTS.md section 1.2: GTSRB + Fashion-MNIST, read out
on CIFAR-10 like ``predict``, 36.6% against our predictor's 34.4%). This loss adds that pressure to
meta-training: one linear head, shared by every task and trained with the hypernetwork, classifies
each query image's *pooled source class* (``TaskSampler(source_labels=True)``) from the predicted
backbone's penultimate features. Its gradient reaches the hypernetwork through those features.

The head exists only in meta-training: it lives in the train state (its own params and Adam
state), never in the hypernetwork's params or an export, and ``predict`` does not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pudnet_jax.hypernet.ridge import centre_and_scale
from pudnet_jax.models import get_target


def feature_dim(config) -> int:
    """Width of the target's pooled penultimate features (the head's input)."""
    target = get_target(config.model.target, config.model.num_classes)
    image = jnp.zeros((1, config.model.image_size, config.model.image_size, config.model.channels))
    shapes = jax.eval_shape(lambda: target.init_with_output(
        jax.random.key(0), image, train=False, features_only=True)[0])
    return int(shapes.shape[-1])


def enabled(config) -> bool:
    return float(config.train.source_loss_weight) > 0.0


def sampler_options(config) -> dict:
    """``TaskSampler`` keywords choosing which query images get a source label.

    ``train.source_head_datasets`` ('' = every pool; e.g. 'gtsrb,fashion_mnist' leaves Omniglot's
    characters out) and ``train.source_head_upright_only`` (only unrotated images, one class
    per original class). Saved configs from before these fields existed get the label-everything
    defaults from ``checkpoints.upgrade_legacy_config``.
    """
    if not enabled(config):
        return {}
    names = [n.strip() for n in str(config.train.source_head_datasets).split(",") if n.strip()]
    return {"source_label_datasets": names or None,
            "source_label_upright": bool(config.train.source_head_upright_only)}


def init_source_head(config, rng) -> dict:
    """``{'kernel': [D, C], 'bias': [C]}`` for ``C = config.train.num_source_classes``.

    LeCun-normal kernel (not zeros: a zero head passes no gradient to the features at step 0).
    """
    num_classes = int(config.train.num_source_classes)
    if num_classes < 1:
        raise ValueError(
            "train.source_loss_weight > 0 needs train.num_source_classes (the pooled classes of the "
            "meta-training sources); train_and_evaluate fills it in from the sampler "
            f"(TaskSampler.num_source_classes). Got {num_classes}.")
    dim = feature_dim(config)
    kernel = jax.nn.initializers.lecun_normal()(rng, (dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def make_source_head_optimizer(config) -> optax.GradientTransformation:
    """Adam at a constant ``train.source_head_learning_rate``: the head starts from scratch while
    the hypernetwork may be warm-started at a small learning rate, so it gets its own rate."""
    return optax.chain(optax.clip_by_global_norm(config.train.grad_clip),
                       optax.adam(config.train.source_head_learning_rate))


def standardize_features(features, weights):
    """``features [N, D]`` centred on their weighted mean and divided by one global RMS.

    The same normalisation as the ridge solve (``hypernet/ridge.py``). Each task's predicted
    backbone has its own activation scale (its BatchNorm statistics come from its own support), so
    a head shared by all tasks reads raw features on a scale that jumps from task to task. That
    is one suspect for the head that did not learn in sessions 13 and 15.
    """
    # With no labelled row the scale is 1, so the (fully masked) rows stay finite.
    mean, _, scale = centre_and_scale(features, weights)
    return (features - mean) / scale


def scale_gradient(x, scale):
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    frozen = jax.lax.stop_gradient(x)
    return frozen + scale * (x - frozen)


def hypernet_gradient_scale(config, step):
    """How much of the source loss's gradient reaches the hypernetwork at ``step``.

    A linear ramp from 0 to 1 over ``train.source_head_warmup_steps`` (0: always 1). While it
    ramps, the head still trains at full strength: a head starting from random weights first
    learns to read the current features, before its gradient is allowed to reshape them.
    """
    warmup = int(config.train.source_head_warmup_steps)
    if warmup <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / warmup, 0.0, 1.0)


def source_head_sums(head: dict, features, source_labels, mask, standardize: bool = False):
    """``(cross-entropy sum, correct count, labelled count)`` of the head on ``features [N, D]``.

    Sums, not means: a task can hold no labelled row at all (an Omniglot task when
    ``train.source_head_datasets`` leaves Omniglot out), and a per-task mean would give it loss 0,
    diluting the loss by the share of such tasks in the batch. The caller divides the batch's
    totals (``train_step.make_loss_fn``). Rows with ``source_labels < 0`` (images the sampler gives no source
    label: ``train.source_head_datasets``, ``train.source_head_upright_only``) count as masked.
    ``standardize`` (``train.source_head_standardize``) reads the features through
    ``standardize_features`` over the labelled rows.
    """
    weights = (mask & (source_labels >= 0)).astype(jnp.float32)
    if standardize:
        features = standardize_features(features, weights)
    logits = features @ head["kernel"] + head["bias"]
    source_labels = jnp.maximum(source_labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, source_labels)
    correct = (jnp.argmax(logits, -1) == source_labels).astype(jnp.float32)
    return (ce * weights).sum(), (correct * weights).sum(), weights.sum()


def source_head_loss(head: dict, features, source_labels, mask, standardize: bool = False):
    """Masked mean cross-entropy and accuracy of the head over the labelled rows (``source_head_sums``)."""
    ce, correct, count = source_head_sums(head, features, source_labels, mask, standardize)
    n = jnp.maximum(count, 1.0)
    return ce / n, correct / n
