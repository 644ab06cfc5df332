"""The PudNet hypernetwork: set encoder, weight-shared recurrent cell, parameter head."""

from __future__ import annotations

from pudnet_jax.hypernet.pudnet import PudNet, abstract_target_variables, target_specs
from pudnet_jax.validation import positive_int

__all__ = ["PudNet", "abstract_target_variables", "build_hypernet", "target_specs"]


def build_hypernet(config, num_classes: int | None = None) -> PudNet:
    """Builds the hypernetwork described by ``config.model`` and ``config.hyper``.

    ``num_classes`` overrides ``config.model.num_classes``: the hypernetwork's parameters do not
    depend on the class count, so one trained hypernetwork predicts heads of any size.
    """
    model, hyper = config.model, config.hyper
    num_classes = positive_int("num_classes" if num_classes is not None else "model.num_classes",
                               num_classes if num_classes is not None else model.num_classes)
    for name in ("image_size", "channels"):
        positive_int(f"model.{name}", model[name])
    for name in ("feature_dim", "sketch_dim", "hidden_dim", "code_rank", "max_channels"):
        positive_int(f"hyper.{name}", hyper[name])
    if not len(hyper.encoder_widths):
        raise ValueError("hyper.encoder_widths must list at least one width; got ().")
    for width in hyper.encoder_widths:
        positive_int("hyper.encoder_widths", width)
    return PudNet(
        target_name=model.target,
        num_classes=num_classes,
        image_shape=(model.image_size, model.image_size, model.channels),
        encoder_widths=tuple(hyper.encoder_widths),
        feature_dim=hyper.feature_dim,
        sketch_dim=hyper.sketch_dim,
        encoder_downsample=int(hyper.encoder_downsample),
        hidden_dim=hyper.hidden_dim,
        code_rank=hyper.code_rank,
        max_channels=hyper.max_channels,
        recurrent=hyper.recurrent,
        sketch_conditioning=hyper.sketch_conditioning,
        classifier=hyper.classifier,
        ridge_lambda=float(hyper.ridge_lambda),
        stem_pca_components=int(hyper.stem_pca_components),
        data_layers=str(hyper.data_layers),
        data_layers_patch_stride=int(hyper.data_layers_patch_stride),
        data_layers_residual_scale=float(hyper.data_layers_residual_scale),
        data_layers_normalized_residual=bool(hyper.data_layers_normalized_residual),
        data_layers_discriminant_eps=float(hyper.data_layers_discriminant_eps),
        batchnorm_residual_scale=float(hyper.batchnorm_residual_scale),
    )
