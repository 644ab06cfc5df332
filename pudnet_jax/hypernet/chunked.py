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
- with ``hyper.data_layers``, every conv's kernel is built from its own input's statistics over
  the whole batch (``hypernet.data_layers``), an input that depends on every earlier kernel and
  BatchNorm layer: likewise one sweep per conv, summing what ``data_layers.conv_input_sums``
  reads from the chunk (patch moments, class map sums), then the kernel from the batch's sums.

The rest of ``PudNet`` runs unchanged: Flax method interceptors replace the encoder and
``PudNet.batch_norm_pass``, so the parameter tree, the head and the classifier are the same code
as the unchunked path, and the results agree with it up to float summation order (tests check
this for every ``hyper.data_layers`` mode).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pudnet_jax.hypernet import data_layers
from pudnet_jax.hypernet.encoder import ImageEncoder
from pudnet_jax.hypernet.head import get_path, replaced_path
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


def _layer_calls(target, params, batch_stats, image):
    """``(kind, path)`` of the target's ``nn.Conv`` (``'conv'``) and ``nn.BatchNorm``
    (``'batch_norm'``) calls in call order: a forward order, since a layer's input never depends
    on a layer called after it."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            if isinstance(context.module, nn.Conv):
                calls.append(("conv", tuple(context.module.path)))
            elif isinstance(context.module, nn.BatchNorm):
                calls.append(("batch_norm", tuple(context.module.path)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, s, x: target.apply({"params": p, "batch_stats": s}, x, train=False,
                                                    features_only=True), params, batch_stats, image)
    if len(set(calls)) != len(calls):
        raise ValueError("The chunked pass needs every conv and BatchNorm layer of the target "
                         "called once per forward pass.")
    return calls


def _nest(flat: dict) -> dict:
    out = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _batch_norm_sums(y, m):
    """Masked sums of a BatchNorm layer's input ``y`` over every axis but the channels."""
    w = m.astype(y.dtype).reshape((-1,) + (1,) * (y.ndim - 1))
    axes = tuple(range(y.ndim - 1))
    return {"sum": jnp.sum(y * w, axes), "sum_sq": jnp.sum(jnp.square(y) * w, axes),
            "count": jnp.sum(w) * (y.size // (y.shape[0] * y.shape[-1]))}


def chunked_batch_stats(target, params, images, mask, chunk_size: int, labels=None,
                        data_layer_settings: dict | None = None):
    """Exact full-batch BatchNorm statistics (masked, biased variance, as ``nn.BatchNorm``) and the
    pooled penultimate features ``[N, D]``, computed ``chunk_size`` images at a time.

    ``target`` is an unbound target network; ``params`` its predicted params. With
    ``data_layer_settings`` (``data_layers.kernel_from_sums``' keyword arguments plus ``mode``
    and ``num_classes``), every conv kernel is first rebuilt from its input on the whole batch
    (``labels``: the batch's, for the labelled modes), as ``data_layers.forward_with_data_layers``
    does in one pass.

    Returns ``(params, batch_stats, features)``: ``params`` with the rebuilt kernels (unchanged
    without ``data_layer_settings``).
    """
    n = images.shape[0]
    chunks = {"x": _chunks(images, chunk_size), "m": _chunks(mask, chunk_size)}
    if labels is not None:
        chunks["y"] = _chunks(labels, chunk_size)
    abstract = jax.eval_shape(lambda: target.init(jax.random.key(0), images[:1], train=False))
    placeholder = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract["batch_stats"])
    known = {}  # BatchNorm path -> {'mean', 'var'}, filled layer by layer
    settings = dict(data_layer_settings or {})
    mode, num_classes = settings.pop("mode", None), settings.pop("num_classes", None)

    def stats_so_far():
        # Layers not reached yet keep the placeholder: their outputs are never used (dead code).
        return _nest({**_flatten(placeholder), **known})

    for kind, layer in _layer_calls(target, params, placeholder, images[:1]):
        if kind == "conv" and mode is None:
            continue
        kernel_path = layer + ("kernel",)
        kernel_size = get_path(params, kernel_path).shape[0] if kind == "conv" else None
        variables = {"params": params, "batch_stats": stats_so_far()}

        def sums(chunk, kind=kind, layer=layer, kernel_size=kernel_size, variables=variables):
            out = {}

            def record(next_fun, args, kwargs, context):
                module = context.module
                if context.method_name == "__call__" and tuple(module.path) == layer:
                    if kind == "batch_norm":
                        out.update(_batch_norm_sums(args[0], chunk["m"]))
                    else:
                        data_layers.check_plain_conv(module)
                        out.update(data_layers.conv_input_sums(
                            mode, args[0], chunk["m"], kernel_size,
                            settings.get("patch_stride", 1), chunk.get("y"), num_classes))
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(record):
                target.apply(variables, chunk["x"], train=False, features_only=True)
            return out

        total = jax.tree.map(lambda s: s.sum(0), jax.lax.map(sums, chunks))
        if kind == "conv":
            kernel = data_layers.kernel_from_sums(mode, total, get_path(params, kernel_path), **settings)
            params = replaced_path(params, kernel_path, kernel)
        else:
            count = jnp.maximum(total["count"], 1.0)
            mean = total["sum"] / count
            known[layer] = {"mean": mean, "var": jnp.maximum(0.0, total["sum_sq"] / count - mean**2)}

    batch_stats = stats_so_far()
    features = jax.lax.map(lambda x: target.apply({"params": params, "batch_stats": batch_stats}, x,
                                                  train=False, features_only=True), chunks["x"])
    return params, batch_stats, _unchunk(features, n)


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
    state = {"inside": False, "passes": 0}

    def intercept(next_fun, args, kwargs, context):
        if state["inside"]:
            return next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, ImageEncoder) and context.method_name == "__call__":
            # Per-image features, chunk by chunk, with this submodule's own parameters.
            encoder, variables = module.clone(parent=None), module.variables
            state["inside"] = True
            try:
                features = jax.lax.map(lambda x: encoder.apply(variables, x),
                                       _chunks(args[0], chunk_size))
            finally:
                state["inside"] = False
            return _unchunk(features, n)
        if context.method_name == "batch_norm_pass":
            # PudNet's BatchNorm pass over the target (and its data layers, if any).
            params, pass_images, pass_labels, pass_mask = args
            settings = None
            if module.data_layers != "none":
                settings = {**module.data_layer_settings(), "num_classes": module.num_classes}
                # Refuses the settings the unchunked path refuses, with the same messages.
                data_layers.kernel_builder(labels=pass_labels, **settings)
            target = get_target(module.target_name, module.num_classes, parent=None)
            state["inside"] = True
            try:
                params, stats, features = chunked_batch_stats(
                    target, params, pass_images, pass_mask, chunk_size, pass_labels, settings)
            finally:
                state["inside"] = False
            state["passes"] += 1
            return params, features, stats
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
        variables = hypernet.apply(hyper_params, images, labels, mask)
    if state["passes"] != 1:
        raise RuntimeError("chunked_apply did not find the hypernetwork's BatchNorm pass.")
    return variables
