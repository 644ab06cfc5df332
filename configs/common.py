"""Fields shared by every config, and the argument parser for ``get_config(arg)``.

Configs are Python files returning an ``ml_collections.ConfigDict`` (big_vision style). Every field
is overridable on the command line, e.g. ``--config.train.num_steps=200``.
"""

from __future__ import annotations

import ml_collections

from pudnet_jax.hypernet.data_layers import RESIDUAL_SCALE
from pudnet_jax.hypernet.discriminant import DISCRIMINANT_EPS
from pudnet_jax.hypernet.ridge import DEFAULT_RIDGE_LAMBDA


def parse_arg(arg: str | None, positional: str | None = None, **defaults) -> ml_collections.ConfigDict:
    """Parses ``"gtsrb,quick"`` or ``"dataset=gtsrb,size=gpu"`` into a ConfigDict of ``defaults``.

    ``key=value`` sets any key (converted to the default's type); a bare word that names a boolean
    key sets it to True (``quick``); any other bare word sets the ``positional`` key (``gtsrb``).
    """
    out = ml_collections.ConfigDict(dict(defaults))
    for token in filter(None, (arg or "").split(",")):
        key, value = token.split("=", 1) if "=" in token else (None, token)
        if key is None and isinstance(defaults.get(value), bool):
            out[value] = True
            continue
        key = key or positional
        if key not in defaults:
            raise ValueError(f"Unknown config argument {token!r}; known keys: {sorted(defaults)}.")
        default = defaults[key]
        out[key] = value in ("1", "true", "True") if isinstance(default, bool) else type(default)(value)
    return out


def base_config() -> ml_collections.ConfigDict:
    """The defaults every setting starts from (a CPU-sized resnet8 run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data_dir = ""  # empty: $PUDNET_DATA_DIR, else ../shared/data beside the repo
    c.cache_dir = ""  # empty: ~/.cache/pudnet_jax (never the read-only data dir)

    c.model = ml_collections.ConfigDict()
    c.model.target = "resnet8"
    c.model.num_classes = 20  # largest way the predictor handles in meta-training
    c.model.image_size = 32
    c.model.channels = 3

    c.hyper = ml_collections.ConfigDict()
    c.hyper.encoder_widths = (32, 64, 128, 128)
    c.hyper.feature_dim = 128
    c.hyper.sketch_dim = 128
    # The set encoder reads images average-pooled by this factor (2: ~4x cheaper encoder).
    c.hyper.encoder_downsample = 1
    c.hyper.hidden_dim = 256
    c.hyper.code_rank = 32
    c.hyper.max_channels = 512
    c.hyper.recurrent = True
    c.hyper.sketch_conditioning = True
    # How the target's Dense layer is solved from its own features on the dataset batch:
    # prototype (class means) | ridge (closed-form ridge regression) | generated (ablation).
    c.hyper.classifier = "prototype"
    c.hyper.ridge_lambda = DEFAULT_RIDGE_LAMBDA  # ridge only; relative to the features' variance
    # predict also reads the horizontal mirror of every image it is given (2x its BatchNorm pass
    # and classifier rows): only for data whose classes survive a flip (natural images).
    c.hyper.mirror_support = False
    # m > 0: the target's first conv gets m principal directions of the batch's own patches (and
    # their negatives) as its first 2m filters, instead of the head's (pudnet_jax/hypernet/stem.py).
    c.hyper.stem_pca_components = 0
    # none | pca_residual | discriminant_residual | whitened: build every conv on its own input's
    # patch statistics on the batch (principal directions, or the directions that separate the
    # batch's classes), with the head's kernel as a correction, or apply the head's kernel to
    # whitened patches (pudnet_jax/hypernet/data_layers.py).
    c.hyper.data_layers = "none"
    # s > 1: data_layers estimate each conv's patch statistics from every s-th patch position
    # per axis (s**2 times less work for the costliest part of predict under data_layers).
    c.hyper.data_layers_patch_stride = 1
    # *_residual: kernel = data-derived directions + this x the head's kernel (the head's filters
    # have norm ~sqrt(2) x its gain, the PCA filters 1: 0.25 starts the correction at ~1/3).
    c.hyper.data_layers_residual_scale = RESIDUAL_SCALE
    # *_residual: the head's filters enter at unit norm, so the scale above is the correction's
    # size relative to the data-derived filters. Off, the head's gain is free and meta-training
    # grows it until the data-derived directions are ~1% of the kernel (RESULTS.md, session 24).
    c.hyper.data_layers_normalized_residual = False
    # discriminant_residual: whitening regulariser of the discriminant directions, relative to the
    # mean patch-covariance eigenvalue. Larger values damp directions of little variance; in a first
    # closed-form measurement float summation order then moved the network less (results/row_order/).
    c.hyper.data_layers_discriminant_eps = DISCRIMINANT_EPS
    # Weight of the head's predicted BatchNorm offsets: scale = 1 + w * a(h), bias = w * b(h).
    # 1 uses them as meta-trained; 0 leaves every BatchNorm at (1, 0), which with the data layers at
    # residual scale 0 is the closed-form network of pudnet_jax/pca_backbone.py (an inference dial:
    # the parameters do not depend on it; compare_predictors --variants scores it).
    c.hyper.batchnorm_residual_scale = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.setting = "intra"  # intra | inter
    c.data.dataset = "omniglot"  # intra: the dataset whose unseen classes are evaluated
    c.data.held_out = "cifar10"  # inter: the dataset never seen in meta-training
    # inter, leave-one-source-out validation: this source is also left out of meta-training, and
    # validation (best-checkpoint selection) scores whole-dataset tasks of it, built like the
    # held-out dataset's (predict_shots per class of its train split, scored on its test split),
    # so the selection signal measures transfer to an unseen dataset, not fit to the sources.
    c.data.validation_dataset = ""
    c.data.split_seed = 0
    c.data.way = 20
    c.data.min_way = 0  # >0: draw the way per task from [min_way, way]
    # >0: meta-training tasks of this (larger) way, while validation and evaluation keep `way`
    # (ProtoNets train Omniglot with more ways than they test); model.num_classes must hold it.
    c.data.train_way = 0
    c.data.shots = 5  # support images per class the hypernetwork sees in meta-training
    # >0: meta-training tasks take this many support images per class (each source capped at what
    # its smallest class holds after the queries: Omniglot's 20 drawings give 10 with 10 queries),
    # while validation tasks keep `shots`; closer to evaluation's `predict_shots`.
    c.data.train_shots = 0
    c.data.queries = 5  # query images per class for the meta-training loss
    c.data.tasks_per_batch = 4
    c.data.augment = False
    c.data.class_rotations = 1  # 4: rotated classes as new classes in meta-training (GTSRB preset uses it)
    # inter: fraction of meta-training tasks whose classes mix all sources (TaskSampler); a
    # within-source task's way is capped by its source (Fashion-MNIST: 10 classes, 40 rotated).
    c.data.cross_source_prob = 0.0
    c.data.num_val_tasks = 10
    c.data.num_eval_tasks = 100
    c.data.predict_shots = 15  # per class, the sample `predict` sees at evaluation time
    c.data.eval_task_seed = 0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 20_000
    c.train.init_from = ""  # export or workdir whose hyper params start a fresh run (warm start)
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.end_lr_fraction = 0.01
    c.train.weight_decay = 1e-4
    c.train.grad_clip = 1.0
    c.train.log_every = 20
    c.train.eval_every = 500
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    # Auxiliary supervised loss over the pooled source classes (pudnet_jax/source_head.py): a
    # linear head shared by all tasks reads the predicted backbone's query features. 0 = off.
    c.train.source_loss_weight = 0.0
    c.train.source_head_learning_rate = 1e-3
    c.train.num_source_classes = 0  # filled in by the run from its pools; leave 0
    # Which source classes the head classifies: comma-separated pool names ('' = every pool), and
    # whether only unrotated images get a label (one class per original class, as the
    # supervised probe of RESULTS.md 1.2 trains) rather than every rotated copy as a class.
    c.train.source_head_datasets = ""
    c.train.source_head_upright_only = False
    # Standardise the head's input features per task (centre, divide by one RMS, as the ridge
    # solve does): each predicted backbone has its own activation scale.
    c.train.source_head_standardize = False
    # Steps over which the source loss's gradient into the hypernetwork ramps from 0 to 1 (the
    # head itself trains at full strength from step 0, so it first learns to read the features).
    c.train.source_head_warmup_steps = 0
    # > 0: cross-source lookahead (first-order MLDG; pudnet_jax/train.py): each batch pairs two
    # sources, and the second half's gradient is taken after this many optimiser steps along the
    # first half's, so updates that fit one source at the other's expense are penalised. Needs an
    # inter run with >= 2 sources and data.tasks_per_batch a multiple of 2 x devices. 0 = off.
    c.train.lookahead_scale = 0.0
    c.train.task_loop = "unroll"  # unroll (fast on CPU) | vmap (grouped convs; try on GPU/TPU)
    c.train.tensorboard = False
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64  # target training batch for the from-scratch / fine-tune baselines
    c.eval.scratch_epochs = 20
    c.eval.scratch_lrs = (3e-4, 1e-3, 3e-3)
    c.eval.finetune_epochs = 5
    c.eval.finetune_lr = 3e-5  # 3e-4 wrecks the predicted network within an epoch (benchmark sweep)
    c.eval.num_baseline_tasks = 10  # tasks on which the (slow) training baselines run
    return c


def apply_size_and_quick(c: ml_collections.ConfigDict, size: str, quick: bool) -> None:
    """``size='gpu'``: the paper's ResNet-18 target, sized for one GPU. ``quick``: a run of a few
    minutes on a laptop CPU (300 steps, narrower hypernetwork) that still learns visibly."""
    if size == "gpu":
        c.model.target = "resnet18"
        c.data.tasks_per_batch = 8
        c.train.num_steps = 50_000
    elif size != "cpu":
        raise ValueError(f"size must be 'cpu' or 'gpu', got {size!r}.")
    if quick:
        c.train.num_steps = 300
        c.train.warmup_steps = 20
        c.train.eval_every = 100
        c.train.checkpoint_every = 100
        c.data.tasks_per_batch = 2
        c.data.num_val_tasks = 4
        c.hyper.encoder_widths = (32, 32, 64, 64)
        c.hyper.hidden_dim = 128
        c.hyper.code_rank = 16
