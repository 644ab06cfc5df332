"""Predict with a memory footprint bounded by a chunk size instead of the dataset size.

``PudNet.apply`` holds every image's activations at once: for a ResNet-18 target on 5,000 images
at 32x32 that is about 8.5 GiB of host memory on CPU (measured, peak RSS; XLA's own estimate is
6.3 GiB of temporaries), and it grows linearly with the dataset. Two passes see the whole batch:

- the set encoder: its per-image features are small (``feature_dim`` floats per image), so they
  are computed chunk by chunk and concatenated; pooling them is then unchanged;
- the BatchNorm pass: the statistics of BatchNorm layer ``l`` are means over the whole batch of
  an activation that itself depends on the full-batch statistics of every earlier layer. With
  memory bounded by the chunk, nothing can be kept between layers, so there is one sweep over the
  chunks per BatchNorm layer, each running the target up to that layer (XLA drops the rest) and
  summing ``x`` and ``x**2`` over valid rows. That costs about ``L/2`` forward passes for ``L``
  BatchNorm layers (20 for ResNet-18): a trade of compute for memory, hence opt-in.

The rest of ``PudNet`` runs unchanged: Flax method interceptors replace the two passes, so the
parameter tree, the head and the classifier are the same code as the unchunked path, and the
results agree with it up to float summation order (a test checks this).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pudnet_jax.hypernet.encoder import ImageEncoder
from pudnet_jax.models import get_target


def _chunks(x, chunk_size: int):
    """``[N, ...]`` -> ``[ceil(N / chunk), chunk, ...]``, zero-padded at the end."""
    n = x.shape[0]
    num = -(-n // chunk_size)
    pad = num * chunk_size - n
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(num, chunk_size, *x.shape[1:])


def _unchunk(x, n: int):
    return x.reshape(-1, *x.shape[2:])[:n]


def _batch_norm_paths(target, params, batch_stats, image):
    """Paths of the target's BatchNorm layers in call order (a forward order: a layer's input
    never depends on a layer called after it)."""
    paths = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            paths.append(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, s, x: target.apply({"params": p, "batch_stats": s}, x, train=False,
                                                    features_only=True), params, batch_stats, image)
    return paths


def _nest(flat: dict) -> dict:
    out = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def chunked_batch_stats(target, params, images, mask, chunk_size: int):
    """Exact full-batch BatchNorm statistics (masked, biased variance, as ``nn.BatchNorm``) and the
    pooled penultimate features ``[N, D]``, computed ``chunk_size`` images at a time.

    ``target`` is an unbound target network; ``params`` its predicted params.
    """
    n = images.shape[0]
    x_chunks, m_chunks = _chunks(images, chunk_size), _chunks(mask, chunk_size)
    abstract = jax.eval_shape(lambda: target.init(jax.random.key(0), images[:1], train=False))
    placeholder = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract["batch_stats"])
    known = {}  # path -> {'mean', 'var'}, filled layer by layer

    def stats_so_far():
        # Layers not reached yet keep the placeholder: their outputs are never used (dead code).
        return _nest({**_flatten(placeholder), **known})

    for layer in _batch_norm_paths(target, params, placeholder, images[:1]):
        batch_stats = stats_so_far()

        def sums(chunk, layer=layer, batch_stats=batch_stats):
            x, m = chunk
            out = {}

            def record(next_fun, args, kwargs, context):
                if (isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__"
                        and tuple(context.module.path) == layer):
                    y = args[0]
                    w = m.astype(y.dtype).reshape((-1,) + (1,) * (y.ndim - 1))
                    axes = tuple(range(y.ndim - 1))
                    out["sum"] = jnp.sum(y * w, axes)
                    out["sum_sq"] = jnp.sum(jnp.square(y) * w, axes)
                    out["count"] = jnp.sum(w) * (y.size // (y.shape[0] * y.shape[-1]))
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(record):
                target.apply({"params": params, "batch_stats": batch_stats}, x, train=False,
                             features_only=True)
            return out

        total = jax.tree.map(lambda s: s.sum(0), jax.lax.map(sums, (x_chunks, m_chunks)))
        count = jnp.maximum(total["count"], 1.0)
        mean = total["sum"] / count
        known[layer] = {"mean": mean, "var": jnp.maximum(0.0, total["sum_sq"] / count - mean**2)}

    batch_stats = stats_so_far()
    features = jax.lax.map(lambda x: target.apply({"params": params, "batch_stats": batch_stats}, x,
                                                  train=False, features_only=True), x_chunks)
    return batch_stats, _unchunk(features, n)


def _flatten(tree) -> dict:
    """Nested batch_stats -> {path of the BatchNorm layer: {'mean', 'var'}}."""
    out = {}

    def visit(node, path):
        if set(node) == {"mean", "var"}:
            out[path] = dict(node)
        else:
            for key, child in node.items():
                visit(child, path + (key,))

    visit(tree, ())
    return out


def chunked_apply(hypernet, hyper_params, images, labels, mask, chunk_size: int):
    """``hypernet.apply(hyper_params, images, labels, mask)`` with memory bounded by ``chunk_size``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of images; got {chunk_size}.")
    n = images.shape[0]
    target_type = type(get_target(hypernet.target_name, hypernet.num_classes))
    state = {"inside": False, "batch_stats": None}

    def intercept(next_fun, args, kwargs, context):
        if state["inside"] or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, ImageEncoder):
            # Per-image features, chunk by chunk, with this submodule's own parameters.
            encoder, variables = module.clone(parent=None), module.variables
            state["inside"] = True
            try:
                features = jax.lax.map(lambda x: encoder.apply(variables, x),
                                       _chunks(args[0], chunk_size))
            finally:
                state["inside"] = False
            return _unchunk(features, n)
        if isinstance(module, target_type) and kwargs.get("train") and kwargs.get("features_only"):
            # PudNet's BatchNorm pass over the target (train mode, momentum 0, mask).
            target, params = module.clone(parent=None), module.variables["params"]
            state["inside"] = True
            try:
                stats, features = chunked_batch_stats(target, params, args[0], kwargs["mask"],
                                                      chunk_size)
            finally:
                state["inside"] = False
            state["batch_stats"] = stats
            return features
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
        variables = hypernet.apply(hyper_params, images, labels, mask)
    if state["batch_stats"] is None:
        raise RuntimeError("chunked_apply did not find the hypernetwork's BatchNorm pass.")
    return {**variables, "batch_stats": state["batch_stats"]}
