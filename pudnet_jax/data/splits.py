"""Fixed-seed class splits of the evaluation protocol (docs/protocol.md).

Every split is a pure function of its seed (numpy `default_rng(seed)`), and `to_dict()` gives
the exact class ids so results files record them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pudnet_jax.data import sources

# Leave-one-dataset-out pool of the inter-dataset setting.
INTER_DATASETS = ('omniglot', 'gtsrb', 'cifar10', 'fashion_mnist')


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Class ids (the dataset's original labels) for meta-training, meta-validation and the
    unseen evaluation classes; the three are disjoint."""

    dataset: str
    seed: int
    meta_train: tuple[int, ...]
    meta_val: tuple[int, ...]
    unseen: tuple[int, ...]
    note: str = ''

    def __post_init__(self):
        parts = {'meta_train': self.meta_train, 'meta_val': self.meta_val,
                 'unseen': self.unseen}
        for part, ids in parts.items():
            if len(set(ids)) != len(ids):
                raise ValueError(f'{self.dataset} split: {part} has repeated class ids')
        for a, b in (('meta_train', 'meta_val'), ('meta_train', 'unseen'),
                     ('meta_val', 'unseen')):
            common = set(parts[a]) & set(parts[b])
            if common:
                raise ValueError(f'{self.dataset} split: {a} and {b} share classes '
                                 f'{sorted(common)[:10]}')

    def to_dict(self) -> dict:
        """JSON-ready record of the split (class ids as lists)."""
        return {'dataset': self.dataset, 'seed': self.seed,
                'meta_train': list(self.meta_train), 'meta_val': list(self.meta_val),
                'unseen': list(self.unseen), 'note': self.note}


@dataclasses.dataclass(frozen=True)
class InterSplit:
    """Leave-one-dataset-out: meta-train on `sources`, evaluate on the whole `held_out`."""

    held_out: str
    sources: tuple[str, ...]

    def to_dict(self) -> dict:
        return {'held_out': self.held_out, 'sources': list(self.sources)}


def _permuted_split(dataset: str, seed: int, num_classes: int, sizes: tuple[int, int, int],
                    note: str) -> ClassSplit:
    """Permutes range(num_classes) with default_rng(seed); the first sizes[0] classes are
    meta-train, the next sizes[1] meta-val, the last sizes[2] unseen (each part sorted)."""
    assert sum(sizes) == num_classes, (sizes, num_classes)
    perm = np.random.default_rng(seed).permutation(num_classes)
    a, b = sizes[0], sizes[0] + sizes[1]
    part = lambda ids: tuple(int(i) for i in np.sort(ids))
    return ClassSplit(dataset, seed, part(perm[:a]), part(perm[a:b]), part(perm[b:]), note)


def gtsrb_split(seed: int = 0) -> ClassSplit:
    """GTSRB's 43 classes -> 25 meta-train / 6 meta-val / 12 unseen."""
    return _permuted_split(
        'gtsrb', seed, 43, (25, 6, 12),
        f'default_rng({seed}).permutation(43): first 25 meta_train, next 6 meta_val, '
        'last 12 unseen. Meta-train tasks use the train split; unseen tasks: support = train '
        'split, test = test split.')


def cifar100_split(seed: int = 0) -> ClassSplit:
    """CIFAR-100's 100 fine classes -> 64 / 16 / 20 (TFDS only)."""
    return _permuted_split(
        'cifar100', seed, 100, (64, 16, 20),
        f'default_rng({seed}).permutation(100): first 64 meta_train, next 16 meta_val, '
        'last 20 unseen (fine labels).')


def omniglot_split(seed: int = 0, num_val_alphabets: int = 5, data_dir: str | None = None,
                   backend: str = 'auto') -> ClassSplit:
    """Omniglot: background alphabets -> meta-train / meta-val; evaluation set -> unseen.

    The background (train split, labels 0..963) alphabets are sorted by name and
    `default_rng(seed).choice(..., num_val_alphabets, replace=False)` picks the meta-val ones.
    The unseen classes are the whole evaluation set (test split, 659 classes).
    Alphabets are read from class names ('<Alphabet>/characterNN'), so both back ends agree.
    """
    train = sources.load_split('omniglot', 'train', data_dir, backend)
    test = sources.load_split('omniglot', 'test', data_dir, backend)
    background = np.unique(train.labels)
    alphabet_of = {int(c): train.class_names[c].split('/')[0] for c in background}
    alphabets = sorted(set(alphabet_of.values()))
    if not 0 < num_val_alphabets < len(alphabets):
        raise ValueError(f'num_val_alphabets must be in [1, {len(alphabets) - 1}]; '
                         f'got {num_val_alphabets}')
    rng = np.random.default_rng(seed)
    val_alphabets = sorted(rng.choice(alphabets, num_val_alphabets, replace=False).tolist())
    meta_val = tuple(c for c in alphabet_of if alphabet_of[c] in val_alphabets)
    meta_train = tuple(c for c in alphabet_of if alphabet_of[c] not in val_alphabets)
    unseen = tuple(int(c) for c in np.unique(test.labels))
    note = (f'meta_val alphabets (default_rng({seed}) choice of {num_val_alphabets} from the '
            f'sorted background alphabets): {", ".join(val_alphabets)}. meta_train/meta_val '
            'classes live in the npz train split, unseen in the test split; within a class, '
            'evaluation support = drawings 1-15, test = drawings 16-20.')
    return ClassSplit('omniglot', seed, meta_train, meta_val, unseen, note)


def class_split(dataset: str, seed: int = 0, data_dir: str | None = None,
                backend: str = 'auto') -> ClassSplit:
    """The intra-dataset split of `dataset` ('omniglot', 'gtsrb' or 'cifar100') with default
    sizes; data_dir/backend only matter for Omniglot, whose split reads class names."""
    if dataset == 'omniglot':
        return omniglot_split(seed, data_dir=data_dir, backend=backend)
    makers = {'gtsrb': gtsrb_split, 'cifar100': cifar100_split}
    if dataset not in makers:
        raise ValueError(f'no intra-dataset class split for {dataset!r}; expected one of '
                         f"{sorted(makers) + ['omniglot']}")
    return makers[dataset](seed)


def inter_split(held_out: str = 'cifar10') -> InterSplit:
    """Leave `held_out` out of INTER_DATASETS; meta-train on the other three."""
    if held_out not in INTER_DATASETS:
        raise ValueError(f'unknown held-out dataset {held_out!r}; expected one of '
                         f'{list(INTER_DATASETS)}')
    return InterSplit(held_out, tuple(d for d in INTER_DATASETS if d != held_out))
