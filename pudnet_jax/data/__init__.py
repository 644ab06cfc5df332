"""Data layer: datasets, preprocessing, fixed class splits, meta-training and evaluation tasks.

    from pudnet_jax import data
    pools = data.meta_train_pools('intra', 'omniglot')
    sampler = data.TaskSampler(pools, way=20, shots=5, queries=5, tasks_per_batch=4, seed=0)
    batch = sampler.batch(step)            # see tasks.py for the batch format
    eval_tasks = data.make_eval_tasks('intra', 'omniglot')
"""

from pudnet_jax.data.eval_tasks import (
    INTER_PREDICT_SHOTS,
    INTRA_DEFAULTS,
    EvalTask,
    make_eval_tasks,
    task_manifest,
)
from pudnet_jax.data.prefetch import PrefetchIterator
from pudnet_jax.data.preprocess import (
    PreparedDataset,
    channel_stats,
    clear_prepare_cache,
    default_cache_dir,
    normalize,
    prepare,
    to_model_input,
)
from pudnet_jax.data.sources import (
    DATASETS,
    TFDS_NAMES,
    DatasetNotFoundError,
    ImageSet,
    default_data_dir,
    load_split,
)
from pudnet_jax.data.splits import (
    INTER_DATASETS,
    ClassSplit,
    InterSplit,
    cifar100_split,
    class_split,
    gtsrb_split,
    inter_split,
    omniglot_split,
)
from pudnet_jax.data.tasks import (
    FLIP_PRESERVES_CLASS,
    ClassPool,
    TaskSampler,
    as_dataset_batch,
    augment_images,
    meta_train_pools,
)

clear_caches = clear_prepare_cache  # drops every in-process data cache

__all__ = [
    'ClassPool',
    'ClassSplit',
    'DATASETS',
    'DatasetNotFoundError',
    'EvalTask',
    'FLIP_PRESERVES_CLASS',
    'INTER_DATASETS',
    'INTER_PREDICT_SHOTS',
    'INTRA_DEFAULTS',
    'ImageSet',
    'InterSplit',
    'PrefetchIterator',
    'PreparedDataset',
    'TFDS_NAMES',
    'TaskSampler',
    'as_dataset_batch',
    'augment_images',
    'channel_stats',
    'cifar100_split',
    'class_split',
    'clear_prepare_cache',
    'default_cache_dir',
    'default_data_dir',
    'gtsrb_split',
    'inter_split',
    'load_split',
    'make_eval_tasks',
    'meta_train_pools',
    'normalize',
    'omniglot_split',
    'prepare',
    'task_manifest',
    'to_model_input',
    'clear_caches',
]
