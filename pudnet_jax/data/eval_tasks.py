"""Fixed evaluation tasks of the evaluation protocol, docs/protocol.md (intra- and inter-dataset).

An `EvalTask` keeps indices into prepared splits (not copies: 100 Omniglot tasks or 20 GTSRB
tasks would otherwise hold hundreds of MB) and gathers images on access. All tasks are a pure
function of (setting, dataset, seeds, sizes); `task_manifest` records their class ids and image
indices for results files.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pudnet_jax.data import preprocess, splits, tasks

# Per-dataset defaults of the intra-dataset protocol.
INTRA_DEFAULTS = {
    'omniglot': {'way': 20, 'num_tasks': 100, 'predict_shots': 15},
    'gtsrb': {'way': 10, 'num_tasks': 20, 'predict_shots': 100},
    'cifar100': {'way': 10, 'num_tasks': 20, 'predict_shots': 100},
}
INTER_PREDICT_SHOTS = 100
# Omniglot's within-class split: support drawings 1-15, test drawings 16-20.
OMNIGLOT_SUPPORT_DRAWINGS = 15


@dataclasses.dataclass(frozen=True, eq=False)
class EvalTask:
    """One evaluation task. Labels are positions in `classes` (0..K-1).

    Index arrays point into `support_data` / `test_data` and are class-major in label order
    (ascending index within a class); `predict_indices` is a fixed subset of `support_indices`
    (the "dataset sketch" given to predict), `support_indices` is what from-scratch training
    sees.
    """

    name: str
    dataset: str
    classes: tuple[int, ...]
    support_data: preprocess.PreparedDataset
    support_indices: np.ndarray
    predict_indices: np.ndarray
    test_data: preprocess.PreparedDataset
    test_indices: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def remap(self, original_labels: np.ndarray) -> np.ndarray:
        """Original class ids -> int32 labels 0..K-1 of this task."""
        classes = np.asarray(self.classes)
        order = np.argsort(classes)
        pos = np.searchsorted(classes[order], original_labels)
        pos = np.minimum(pos, len(classes) - 1)
        if np.any(classes[order][pos] != original_labels):
            raise ValueError(f'{self.name}: labels outside the task classes')
        return order[pos].astype(np.int32)

    @property
    def support_images(self) -> np.ndarray:
        return _images(self.support_data, self.support_indices)

    @property
    def support_labels(self) -> np.ndarray:
        return self.remap(self.support_data.labels[self.support_indices])

    @property
    def predict_images(self) -> np.ndarray:
        return _images(self.support_data, self.predict_indices)

    @property
    def predict_labels(self) -> np.ndarray:
        return self.remap(self.support_data.labels[self.predict_indices])

    @property
    def test_images(self) -> np.ndarray:
        return _images(self.test_data, self.test_indices)

    @property
    def test_labels(self) -> np.ndarray:
        return self.remap(self.test_data.labels[self.test_indices])

    def dataset_batch(self, max_way: int | None = None, num_rows: int | None = None) -> dict:
        """The predict sample in the batch format (see tasks.as_dataset_batch)."""
        return tasks.as_dataset_batch(self.predict_images, self.predict_labels, max_way,
                                      num_rows)

    def manifest(self) -> dict:
        """JSON-ready record: class ids and image indices (an index list covering a whole
        split in class-major order is written as {'all': N})."""
        return {
            'name': self.name, 'dataset': self.dataset, 'classes': list(self.classes),
            'support_split': self.support_data.split, 'test_split': self.test_data.split,
            'support_indices': _indices_record(self.support_indices, self.support_data),
            'predict_indices': _indices_record(self.predict_indices, self.support_data),
            'test_indices': _indices_record(self.test_indices, self.test_data),
        }


def task_manifest(eval_tasks) -> dict:
    """JSON-ready record of a list of EvalTasks, for results files."""
    return {'num_tasks': len(eval_tasks),
            'index_order': 'class-major in label order, ascending index within a class',
            'tasks': [t.manifest() for t in eval_tasks]}


def _images(data: preprocess.PreparedDataset, idx: np.ndarray) -> np.ndarray:
    return np.asarray(data.images[idx], np.float32)  # float16 storage -> float32 contract


def _indices_record(idx: np.ndarray, data: preprocess.PreparedDataset):
    if len(idx) == len(data.labels) and np.array_equal(np.sort(idx), np.arange(len(idx))):
        return {'all': int(len(idx))}
    return [int(i) for i in idx]


def make_eval_tasks(setting: str, dataset: str, *, classes: str = 'unseen',
                    num_tasks: int | None = None, way: int | None = None,
                    predict_shots: int | None = None, seed: int = 0, split_seed: int = 0,
                    **prepare_kwargs) -> list[EvalTask]:
    """Fixed evaluation tasks.

    Args:
      setting: 'intra' (dataset in 'omniglot', 'gtsrb', 'cifar100') or 'inter' (dataset is the
        held-out one of splits.INTER_DATASETS; one task holding all its classes).
      classes: intra only: 'unseen' for evaluation, 'meta_val' for validation / LR tuning.
      num_tasks, way, predict_shots: default from INTRA_DEFAULTS (inter: predict_shots=100).
        `way` is capped at the number of available classes (GTSRB has 6 meta-val classes).
      seed: task sampling seed (task t uses default_rng([seed, t])); split_seed: class split.
      prepare_kwargs: passed to preprocess.prepare (data_dir, image_size, cache_dir, ...).
    """
    if setting == 'inter':
        return [_inter_task(dataset, predict_shots or INTER_PREDICT_SHOTS, seed,
                            prepare_kwargs)]
    if setting != 'intra':
        raise ValueError(f"unknown setting {setting!r}; expected 'intra' or 'inter'")
    if dataset not in INTRA_DEFAULTS:
        raise ValueError(f'no intra-dataset protocol for {dataset!r}; expected one of '
                         f'{sorted(INTRA_DEFAULTS)}')
    if classes not in ('unseen', 'meta_val'):
        raise ValueError(f"classes must be 'unseen' or 'meta_val'; got {classes!r}")
    defaults = INTRA_DEFAULTS[dataset]
    num_tasks = defaults['num_tasks'] if num_tasks is None else num_tasks
    predict_shots = predict_shots or defaults['predict_shots']
    split = splits.class_split(dataset, split_seed, prepare_kwargs.get('data_dir'),
                               prepare_kwargs.get('backend', 'auto'))
    pool = np.asarray(getattr(split, classes))
    way = min(way or defaults['way'], len(pool))

    support_data, test_data, support_of, test_of = _class_images(dataset, classes,
                                                                 prepare_kwargs)
    result = []
    for t in range(num_tasks):
        rng = np.random.default_rng([seed, t])
        chosen = rng.choice(pool, way, replace=False)  # random order = label remapping
        result.append(_build(f'{dataset}/{classes}/{way}way/task{t:03d}', dataset, chosen,
                             support_data, test_data, support_of, test_of, predict_shots, rng))
    return result


def _class_images(dataset: str, classes: str, prepare_kwargs: dict):
    """Prepared splits and, per class, the indices of its support and test images."""
    if dataset == 'omniglot':
        # A class's 20 drawings all live in one npz split: background classes (meta-train /
        # meta-val) in 'train', evaluation classes (unseen) in 'test'.
        data = preprocess.prepare('omniglot', 'train' if classes == 'meta_val' else 'test',
                                  **prepare_kwargs)
        return (data, data) + _split_by_drawing(data)
    train = preprocess.prepare(dataset, 'train', **prepare_kwargs)
    test = preprocess.prepare(dataset, 'test', **prepare_kwargs)
    return train, test, train.class_indices, test.class_indices


def _split_by_drawing(data: preprocess.PreparedDataset):
    if 'drawing' not in data.extras:
        raise ValueError(f'{data.name}[{data.split}] has no per-image "drawing" numbers')
    drawing = np.asarray(data.extras['drawing'])
    support = {c: idx[drawing[idx] <= OMNIGLOT_SUPPORT_DRAWINGS]
               for c, idx in data.class_indices.items()}
    test = {c: idx[drawing[idx] > OMNIGLOT_SUPPORT_DRAWINGS]
            for c, idx in data.class_indices.items()}
    return support, test


def _build(name, dataset, chosen, support_data, test_data, support_of, test_of,
           predict_shots, rng) -> EvalTask:
    support, predict, test = [], [], []
    for c in (int(c) for c in chosen):
        if c not in support_of or c not in test_of or not len(test_of[c]):
            raise ValueError(f'{name}: class {c} lacks support or test images')
        support.append(support_of[c])
        n = min(predict_shots, len(support_of[c]))
        predict.append(np.sort(rng.choice(support_of[c], n, replace=False)))
        test.append(test_of[c])
    return EvalTask(name, dataset, tuple(int(c) for c in chosen), support_data,
                    np.concatenate(support), np.concatenate(predict), test_data,
                    np.concatenate(test))


def _inter_task(held_out: str, predict_shots: int, seed: int, prepare_kwargs) -> EvalTask:
    """The whole held-out dataset as one task, in its own label order.

    Omniglot's npz splits have disjoint classes, so a held-out Omniglot is its evaluation set
    (659 classes, test split) with drawings 1-15 as support and 16-20 as test.
    """
    splits.inter_split(held_out)  # validates the name
    classes = 'unseen' if held_out == 'omniglot' else 'all'
    support_data, test_data, support_of, test_of = _class_images(held_out, classes,
                                                                 prepare_kwargs)
    chosen = np.array(sorted(support_of))
    return _build(f'{held_out}/inter/{len(chosen)}way', held_out, chosen, support_data,
                  test_data, support_of, test_of, predict_shots,
                  np.random.default_rng([seed, 0]))
