"""Raw image datasets: the offline `.npz` files in shared/data, or TFDS.

Both back ends return the same `ImageSet`: uint8 NHWC images, int64 labels, class names and
per-image extra arrays (Omniglot's alphabet/character/drawing numbers, GTSRB's track ids, ...).
Nothing here writes into the data directory: it is read-only (docs/protocol.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
import zipfile

import numpy as np

# Datasets the data layer knows. 'cifar100' and 'svhn' exist only through TFDS.
DATASETS = ('omniglot', 'gtsrb', 'cifar10', 'fashion_mnist', 'cifar100', 'svhn')

# Our name -> TFDS builder name. GTSRB has no official TFDS builder, so it is None:
# it can only come from gtsrb.npz.
TFDS_NAMES = {
    'omniglot': 'omniglot',  # train = background (964 classes), test = evaluation (659)
    'gtsrb': None,
    'cifar10': 'cifar10',
    'fashion_mnist': 'fashion_mnist',
    'cifar100': 'cifar100',
    'svhn': 'svhn_cropped',
}

SPLITS = ('train', 'test')
BACKENDS = ('auto', 'npz', 'tfds')

_ENV_DATA_DIR = 'PUDNET_DATA_DIR'
# Set to 0 so TFDS fails at once instead of trying to download (offline, urllib3 retries for
# minutes before giving up).
_ENV_TFDS_DOWNLOAD = 'PUDNET_TFDS_DOWNLOAD'


class DatasetNotFoundError(FileNotFoundError):
    """No back end could provide the dataset; the message says where we looked."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """One split of one dataset, as stored (no resizing, no normalisation).

    Attributes:
      images: uint8 [N, H, W, C].
      labels: int64 [N], indices into `class_names` (global over the dataset's splits:
        Omniglot's test split holds labels 964..1622).
      class_names: name of every class of the dataset (all splits).
      extras: per-image arrays, each with leading dimension N (e.g. Omniglot 'drawing').
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def repo_root() -> pathlib.Path:
    """The repository root: the parent of the `pudnet_jax` package directory."""
    return pathlib.Path(__file__).resolve().parents[2]


def default_data_dir() -> str:
    """`$PUDNET_DATA_DIR` if set, else `<repo>/../shared/data` (returned even if missing,
    so that a DatasetNotFoundError can name it)."""
    env = os.environ.get(_ENV_DATA_DIR)
    if env:
        return env
    return str((repo_root().parent / 'shared' / 'data').resolve())


def load_split(name: str, split: str, data_dir: str | None = None,
               backend: str = 'auto') -> ImageSet:
    """Loads one split of a dataset.

    Args:
      name: one of DATASETS.
      split: 'train' or 'test'.
      data_dir: directory holding `<name>.npz`; default `default_data_dir()`. For the TFDS back
        end, an explicit data_dir is passed to TFDS; by default TFDS uses its own directory
        ($TFDS_DATA_DIR or ~/tensorflow_datasets), never the read-only npz directory. TFDS
        downloads a dataset it lacks (preparing one needs `tensorflow`) unless
        $PUDNET_TFDS_DOWNLOAD=0.
      backend: 'npz', 'tfds', or 'auto' (npz if the file exists, else TFDS if importable).

    Returns:
      An ImageSet whose arrays are read-only (they may be shared through the in-process cache).
    """
    _check_choice('dataset name', name, DATASETS)
    _check_choice('split', split, SPLITS)
    _check_choice('backend', backend, BACKENDS)
    npz_dir = data_dir if data_dir is not None else default_data_dir()
    npz_path = pathlib.Path(npz_dir) / f'{name}.npz'

    if backend == 'npz' or (backend == 'auto' and npz_path.is_file()):
        if not npz_path.is_file():
            raise DatasetNotFoundError(_not_found_message(name, npz_path, tfds_note=None))
        stat = npz_path.stat()
        # Size and mtime in the key: a replaced file is re-read, not served stale.
        return _load_npz_cached(str(npz_path.resolve()), split, stat.st_size, stat.st_mtime_ns)

    tfds_note = _tfds_unavailable_reason(name)
    if tfds_note is not None:
        raise DatasetNotFoundError(_not_found_message(name, npz_path, tfds_note))
    return _load_tfds(name, split, data_dir, npz_path)


def clear_source_cache() -> None:
    """Drops the in-process cache of loaded npz splits (tests, or to free memory)."""
    _load_npz_cached.cache_clear()


# ----------------------------------------------------------------------------- npz back end

@functools.lru_cache(maxsize=8)  # 4 datasets x 2 splits; ~250 MB of uint8 in total
def _load_npz_cached(path: str, split: str, size: int, mtime_ns: int) -> ImageSet:
    del size, mtime_ns  # only part of the cache key
    return _read_npz(path, split)


def _read_npz(path: str, split: str) -> ImageSet:
    required = (f'x_{split}', f'y_{split}', 'class_names')
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in required if k not in f.files]
            # Read the split's arrays now, inside the try: a truncated member only fails here.
            arrays = {k: f[k] for k in f.files
                      if k == 'class_names' or k.endswith(f'_{split}')}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise ValueError(f'{path}: not a readable .npz file (truncated or corrupt?): {e}') from e
    if missing:
        raise ValueError(
            f'{path}: missing keys {missing}; an npz dataset needs x_train, y_train, x_test, '
            f'y_test and class_names (see shared/data/README.md).')
    images = arrays.pop(f'x_{split}')
    labels = arrays.pop(f'y_{split}').astype(np.int64)
    class_names = tuple(str(c) for c in arrays.pop('class_names'))
    n = len(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f'{path}: x_{split} must be uint8 [N,H,W,C], got '
                         f'{images.dtype} {images.shape}')
    if n == 0 or 0 in images.shape[1:3]:
        # An empty train split would give NaN channel statistics (0 / 0) and NaN images.
        raise ValueError(f'{path}: x_{split} holds no images, or images of zero size '
                         f'(shape {images.shape})')
    if labels.shape != (n,):
        raise ValueError(f'{path}: y_{split} has shape {labels.shape}, expected ({n},)')
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f'{path}: y_{split} outside [0, {len(class_names)})')
    # Per-image extras are the other '<key>_<split>' arrays of length N; per-class arrays such
    # as GTSRB's full_count_train (length 43) are not per-image and are skipped.
    extras = {k[:-len(split) - 1]: v for k, v in sorted(arrays.items())
              if v.ndim >= 1 and len(v) == n}
    return _frozen(ImageSet(images, labels, class_names, extras))


# ---------------------------------------------------------------------------- TFDS back end

def _tfds_unavailable_reason(name: str) -> str | None:
    if TFDS_NAMES[name] is None:
        return f'{name} has no official TFDS builder, so only {name}.npz can provide it'
    if importlib.util.find_spec('tensorflow_datasets') is None:
        return 'tensorflow_datasets is not installed'
    return None


def _load_tfds(name: str, split: str, data_dir: str | None,
               npz_path: pathlib.Path) -> ImageSet:
    """Reads a whole TFDS split via `tfds.data_source` (array_record; no TensorFlow needed)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds_name = TFDS_NAMES[name]
    try:
        download = os.environ.get(_ENV_TFDS_DOWNLOAD, '1') != '0'
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=download)
        # Record by record: __getitems__ is not implemented by every TFDS source (not by the
        # mock one); decoding dominates the cost anyway.
        records = [source[i] for i in range(len(source))]
        label_feature = source.dataset_info.features['label']
    except Exception as e:  # TFDS raises many types (download, missing files, ...).
        raise DatasetNotFoundError(_not_found_message(
            name, npz_path, f'TFDS failed to provide {tfds_name}[{split}]: '
                            f'{type(e).__name__}: {e}')) from e
    if not records:
        raise DatasetNotFoundError(f'TFDS split {tfds_name}[{split}] is empty')
    images = np.stack([np.asarray(r['image'], np.uint8) for r in records])
    labels = np.array([int(r['label']) for r in records], np.int64)
    class_names = tuple(label_feature.names)
    extras = {}
    if name == 'omniglot':
        images, class_names, extras = _omniglot_from_tfds(images, labels, class_names, records)
    elif name == 'cifar100':
        extras['coarse_label'] = np.array([int(r['coarse_label']) for r in records], np.int64)
    return _frozen(ImageSet(images, labels, class_names, extras))


def _omniglot_from_tfds(images, labels, class_names, records):
    """Brings TFDS Omniglot to the npz conventions.

    TFDS stores 105x105 RGB copies of the binary images (channel 0 suffices) and names classes
    '<Alphabet>_<k>' with a 0-based k; the npz uses '<Alphabet>/characterNN' (1-based), which
    `omniglot_split` parses. TFDS does not keep the drawing number, so 'drawing' is the 1-based
    rank of the image within its class in record order: a fixed pseudo-random order, so the
    "drawings 1-15 / 16-20" split is then a fixed random 15/5 split, not the official numbers.
    """
    names = []
    for n in class_names:
        m = re.fullmatch(r'(.+)_(\d+)', n)
        names.append(f'{m.group(1)}/character{int(m.group(2)) + 1:02d}' if m else n)
    character = np.array([int(r['alphabet_char_id']) + 1 for r in records], np.int64)
    drawing = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        drawing[idx] = np.arange(1, len(idx) + 1)
    return images[..., :1], tuple(names), {'character': character, 'drawing': drawing}


# ----------------------------------------------------------------------------------- helpers

def _frozen(s: ImageSet) -> ImageSet:
    # Cached sets are shared between callers: make accidental in-place edits fail loudly.
    for a in (s.images, s.labels, *s.extras.values()):
        a.flags.writeable = False
    return s


def _not_found_message(name: str, npz_path: pathlib.Path, tfds_note: str | None) -> str:
    lines = [f'Dataset {name!r} not found.', f'  looked for: {npz_path}'
             + ('' if npz_path.parent.is_dir() else ' (directory does not exist)')]
    if tfds_note:
        lines.append(f'  TFDS: {tfds_note}')
    lines.append(f'To provide it: set {_ENV_DATA_DIR} (or pass data_dir=) to a directory '
                 f'holding {name}.npz (format: shared/data/README.md)')
    if TFDS_NAMES.get(name):
        lines.append(f'  or let TFDS provide {TFDS_NAMES[name]!r}: `pip install tensorflow-datasets '
                     f'array-record` and either a prepared copy under $TFDS_DATA_DIR, or '
                     f'internet plus `tensorflow` for the one-time download and preparation.')
    return '\n'.join(lines)


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f'unknown {what} {value!r}; expected one of {list(choices)}')
