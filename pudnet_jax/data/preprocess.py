"""From stored uint8 images to the target's input: resize, channel conversion, normalisation.

`prepare(name, split)` is the one call most code needs: it returns a `PreparedDataset` whose
images are float32 [N, 32, 32, 3] normalised with the dataset's own train-split statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import numpy as np

from pudnet_jax.data import sources

# ITU-R 601 luma weights (what PIL's convert('L') uses), for RGB -> grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Images per chunk when converting: bounds the float temporaries to ~100 MB.
_CHUNK = 8192
_ENV_CACHE_DIR = 'PUDNET_CACHE_DIR'
_STATS_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedDataset:
    """One split, preprocessed and normalised: what samplers and evaluation read.

    Attributes:
      name, split: which dataset split this is.
      images: [N, H, W, C] normalised images, float32 (or float16 if prepared with
        store_dtype=np.float16; consumers cast gathered batches to float32).
      labels: int64 [N], the dataset's original class ids.
      class_names: names of all classes of the dataset.
      extras: per-image arrays (see sources.ImageSet).
      mean, std: float32 [C], the statistics used to normalise.
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    extras: dict[str, np.ndarray]
    mean: np.ndarray
    std: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @functools.cached_property
    def class_indices(self) -> dict[int, np.ndarray]:
        """Class id -> sorted indices of that class's images (only classes present here)."""
        order = np.argsort(self.labels, kind='stable')
        classes, starts = np.unique(self.labels[order], return_index=True)
        return {int(c): idx for c, idx in zip(classes, np.split(order, starts[1:]))}


def to_model_input(images_uint8: np.ndarray, image_size: int = 32,
                   channels: int = 3) -> np.ndarray:
    """uint8 [N, H, W, C in {1,3}] -> float32 [N, image_size, image_size, channels] in [0, 1].

    Resizing is bilinear with antialiasing when shrinking (the same weights as
    `jax.image.resize(..., 'bilinear')`), done as two small matrix products so it is fast on
    CPU (28->32 and 105->32 alike). Grayscale becomes RGB by replication; RGB becomes grayscale
    by luminance.
    """
    x = np.asarray(images_uint8)
    if x.ndim != 4:
        raise ValueError(f'images must be [N, H, W, C]; got shape {x.shape} '
                         '(add a channel axis with x[..., None] or a batch axis with x[None])')
    if x.dtype != np.uint8:
        raise ValueError(f'images must be uint8 in 0..255; got {x.dtype}')
    if x.shape[-1] not in (1, 3):
        raise ValueError(f'images must have 1 or 3 channels; got {x.shape[-1]} ({x.shape})')
    if 0 in x.shape[1:3]:
        raise ValueError(f'images must be at least 1x1 pixels; got shape {x.shape}')
    if channels not in (1, 3):
        raise ValueError(f'channels must be 1 or 3; got {channels}')
    if image_size < 1:
        raise ValueError(f'image_size must be positive; got {image_size}')
    n = len(x)
    out = np.empty((n, image_size, image_size, channels), np.float32)
    for start in range(0, n, _CHUNK):
        out[start:start + _CHUNK] = _convert_chunk(x[start:start + _CHUNK], image_size, channels)
    return out


def _convert_chunk(x: np.ndarray, size: int, channels: int) -> np.ndarray:
    x = x.astype(np.float32) * np.float32(1 / 255)
    if x.shape[-1] == 3 and channels == 1:  # before resizing: a third of the work
        x = (x @ _LUMA)[..., None]
    _, h, w, c = x.shape
    if (h, w) != (size, size):
        rows = _resize_matrix(h, size)  # [size, h]
        cols = _resize_matrix(w, size)  # [size, w]
        x = np.moveaxis(x, -1, 1)  # [n, c, h, w]: resize is then rows @ image @ cols.T
        x = np.moveaxis(rows @ x @ cols.T, 1, -1)
        np.clip(x, 0.0, 1.0, out=x)  # float rounding can leave 1 + 1e-7
    if c == 1 and channels == 3:
        x = np.broadcast_to(x, x.shape[:-1] + (3,))
    return x


@functools.lru_cache(maxsize=16)
def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D bilinear resizing with half-pixel centres.

    When shrinking, the triangle kernel is widened by in/out (antialiasing), as in
    jax.image.resize / tf.image.resize(antialias=True); weights falling outside the image are
    dropped and each row renormalised, which is edge clamping for plain bilinear.
    """
    scale = out_size / in_size
    support = max(1.0 / scale, 1.0)
    centres = (np.arange(out_size) + 0.5) / scale - 0.5  # output pixel centres, input coords
    dist = np.abs(np.arange(in_size)[None, :] - centres[:, None]) / support
    weights = np.maximum(0.0, 1.0 - dist)
    weights /= weights.sum(axis=1, keepdims=True)
    weights.flags.writeable = False
    return weights.astype(np.float32)


def normalize(x_float01: np.ndarray, mean, std) -> np.ndarray:
    """(x - mean) / std per channel, as float32. mean/std: [C] matching x's last axis."""
    x = np.asarray(x_float01, np.float32)
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    if mean.shape != (x.shape[-1],) or std.shape != mean.shape:
        raise ValueError(f'mean/std must have shape ({x.shape[-1]},) for images {x.shape}; '
                         f'got {mean.shape} and {std.shape}')
    if np.any(std <= 0):
        raise ValueError(f'std must be positive; got {std}')
    return (x - mean) / std


def default_cache_dir() -> str:
    """`$PUDNET_CACHE_DIR` if set, else ~/.cache/pudnet_jax (never the read-only data dir)."""
    return os.environ.get(_ENV_CACHE_DIR) or os.path.expanduser('~/.cache/pudnet_jax')


def channel_stats(name: str, data_dir: str | None = None, cache_dir: str | None = None,
                  image_size: int = 32, channels: int = 3,
                  backend: str = 'auto') -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the dataset's train split after `to_model_input`.

    Computed once and cached as `<cache_dir>/stats_<name>_<size>px_<C>ch.json`; the file also
    records the number of images and the source, and is recomputed if they no longer match.
    """
    data = sources.load_split(name, 'train', data_dir, backend)
    fingerprint = {'num_images': len(data.images), 'image_shape': list(data.images.shape[1:])}
    path = (pathlib.Path(cache_dir or default_cache_dir())
            / f'stats_{name}_{image_size}px_{channels}ch.json')
    try:
        cached = json.loads(path.read_text())
        if cached.get('version') == _STATS_VERSION and cached.get('source') == fingerprint:
            return np.array(cached['mean'], np.float32), np.array(cached['std'], np.float32)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable cache: recompute

    # A grayscale source converted to RGB has three identical channels: compute one, tile it.
    work_channels = 1 if data.images.shape[-1] == 1 else channels
    total = np.zeros(work_channels)
    total_sq = np.zeros(work_channels)
    for start in range(0, len(data.images), _CHUNK):
        x = to_model_input(data.images[start:start + _CHUNK], image_size, work_channels)
        x = x.reshape(-1, work_channels)
        total += x.sum(axis=0, dtype=np.float64)
        total_sq += np.einsum('nc,nc->c', x, x, dtype=np.float64)
    total = np.resize(total, channels)
    total_sq = np.resize(total_sq, channels)
    count = len(data.images) * image_size * image_size
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    record = {'version': _STATS_VERSION, 'name': name, 'image_size': image_size,
              'channels': channels, 'source': fingerprint,
              'mean': mean.tolist(), 'std': std.tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return mean.astype(np.float32), std.astype(np.float32)


def prepare(name: str, split: str, data_dir: str | None = None, image_size: int = 32,
            channels: int = 3, cache_dir: str | None = None, backend: str = 'auto',
            store_dtype=np.float32) -> PreparedDataset:
    """Loads, converts to the model input and normalises one split (cached in memory).

    Both splits are normalised with the train split's statistics. The result is cached per
    process (a few hundred MB per dataset at 32x32x3 float32; store_dtype=np.float16 halves
    that), and its arrays are read-only because they are shared.
    """
    store_dtype = np.dtype(store_dtype)
    if store_dtype not in (np.float32, np.float16):
        raise ValueError(f'store_dtype must be float32 or float16; got {store_dtype}')
    cache_dir = cache_dir or default_cache_dir()
    # data_dir stays None when not given (TFDS must not be pointed at the npz directory);
    # the resolved default joins the cache key so a changed $PUDNET_DATA_DIR is not served
    # stale data.
    return _prepare_cached(name, split, data_dir, sources.default_data_dir(), image_size,
                           channels, cache_dir, backend, store_dtype.name)


def clear_prepare_cache() -> None:
    """Drops the in-process caches of prepared and loaded datasets."""
    _prepare_cached.cache_clear()
    sources.clear_source_cache()


@functools.lru_cache(maxsize=8)
def _prepare_cached(name, split, data_dir, default_dir, image_size, channels, cache_dir,
                    backend, store_dtype) -> PreparedDataset:
    del default_dir  # only part of the cache key
    raw = sources.load_split(name, split, data_dir, backend)
    mean, std = channel_stats(name, data_dir, cache_dir, image_size, channels, backend)
    # Grayscale sources are converted and normalised on one channel, then broadcast to three
    # on assignment: the same values for a third of the work.
    work_channels = 1 if raw.images.shape[-1] == 1 else channels
    images = np.empty((len(raw.images), image_size, image_size, channels), store_dtype)
    for start in range(0, len(images), _CHUNK):
        x = to_model_input(raw.images[start:start + _CHUNK], image_size, work_channels)
        images[start:start + _CHUNK] = normalize(x, mean[:work_channels], std[:work_channels])
    images.flags.writeable = False
    mean.flags.writeable = False
    std.flags.writeable = False
    return PreparedDataset(name, split, images, raw.labels, raw.class_names, raw.extras,
                           mean, std)
