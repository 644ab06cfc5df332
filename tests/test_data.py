"""Tests of pudnet_jax.data on the real offline datasets (shared/data) and on small fakes.

CPU only, about half a minute: only Omniglot, GTSRB and CIFAR-10 are prepared (each once per
session, statistics cached in a temporary directory).
"""

import json
import os
import threading

import numpy as np
import pytest

from pudnet_jax import data
from pudnet_jax.data import preprocess

_HAVE_DATA = all(os.path.isfile(os.path.join(data.default_data_dir(), f'{n}.npz'))
                 for n in ('omniglot', 'gtsrb', 'cifar10'))
needs_data = pytest.mark.skipif(not _HAVE_DATA, reason=f'no npz data in {data.default_data_dir()}')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    """Statistics cache for this test module (never ~/.cache, never the data dir)."""
    return str(tmp_path_factory.mktemp('stats'))


# ------------------------------------------------------------------------------- sources

@needs_data
def test_load_omniglot_splits_have_disjoint_classes_and_drawings():
    train = data.load_split('omniglot', 'train')
    test = data.load_split('omniglot', 'test')
    assert train.images.shape == (19280, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.num_classes == 1623
    assert set(np.unique(train.labels)) == set(range(964))
    assert set(np.unique(test.labels)) == set(range(964, 1623))
    assert set(np.unique(test.extras['drawing'])) == set(range(1, 21))
    assert not train.images.flags.writeable  # shared through the cache


def test_default_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv('PUDNET_DATA_DIR', str(tmp_path))
    assert data.default_data_dir() == str(tmp_path)
    monkeypatch.delenv('PUDNET_DATA_DIR')
    assert data.default_data_dir().endswith(os.path.join('shared', 'data'))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_split('cifar10', 'train', data_dir=str(tmp_path), backend='npz')
    assert str(tmp_path / 'cifar10.npz') in str(err.value)
    assert 'PUDNET_DATA_DIR' in str(err.value)
    # GTSRB has no TFDS builder, so 'auto' fails the same way whether or not TFDS is installed.
    with pytest.raises(data.DatasetNotFoundError, match='gtsrb.npz'):
        data.load_split('gtsrb', 'test', data_dir=str(tmp_path))


def test_truncated_or_incomplete_npz_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {'x_train': rng.integers(0, 255, (50, 8, 8, 1), dtype=np.uint8),
              'y_train': np.zeros(50, np.int16), 'class_names': np.array(['a'])}
    np.savez(tmp_path / 'full.npz', **arrays)
    blob = (tmp_path / 'full.npz').read_bytes()
    (tmp_path / 'cifar10.npz').write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match='cifar10.npz.*truncated or corrupt'):
        data.load_split('cifar10', 'train', data_dir=str(tmp_path), backend='npz')
    np.savez(tmp_path / 'gtsrb.npz', **{k: v for k, v in arrays.items() if k != 'y_train'})
    with pytest.raises(ValueError, match=r"gtsrb.npz: missing keys \['y_train'\]"):
        data.load_split('gtsrb', 'train', data_dir=str(tmp_path), backend='npz')


def test_an_empty_split_is_a_clear_error(tmp_path):
    """Not NaN channel statistics (0 / 0) and NaN images further on."""
    np.savez(tmp_path / 'cifar10.npz', x_train=np.zeros((0, 32, 32, 3), np.uint8),
             y_train=np.zeros(0, np.int16), class_names=np.array(['a']))
    with pytest.raises(ValueError, match=r'cifar10.npz: x_train holds no images.*\(shape \(0, 32, 32, 3\)\)'):
        data.load_split('cifar10', 'train', data_dir=str(tmp_path), backend='npz')


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match='dataset name'):
        data.load_split('mnist', 'train')
    with pytest.raises(ValueError, match='split'):
        data.load_split('cifar10', 'validation')


# ---------------------------------------------------------------------------- preprocess

def test_grayscale_and_rgb_become_32x32x3_in_unit_range():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    big = rng.integers(0, 256, (2, 105, 105, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for x in (gray, big, rgb):
        y = data.to_model_input(x)
        assert y.shape == (len(x), 32, 32, 3) and y.dtype == np.float32
        assert 0.0 <= y.min() and y.max() <= 1.0
    y = data.to_model_input(gray)
    np.testing.assert_array_equal(y[..., 0], y[..., 2])  # replicated channels
    np.testing.assert_allclose(data.to_model_input(rgb), rgb / 255.0, atol=1e-6)  # no resize
    luma = data.to_model_input(rgb, channels=1)
    assert luma.shape == (4, 32, 32, 1)
    np.testing.assert_allclose(luma[..., 0], (rgb / 255.0) @ [0.299, 0.587, 0.114], atol=1e-5)


def test_resize_matches_jax_bilinear():
    jax = pytest.importorskip('jax')
    rng = np.random.default_rng(1)
    for size in (28, 105):  # upsampling, and downsampling with antialiasing
        x = rng.integers(0, 256, (2, size, size, 1), dtype=np.uint8)
        ref = jax.image.resize(x.astype(np.float32) / 255, (2, 32, 32, 1), 'bilinear')
        np.testing.assert_allclose(data.to_model_input(x, channels=1), ref, atol=1e-5)


def test_to_model_input_validates():
    with pytest.raises(ValueError, match='uint8'):
        data.to_model_input(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r'\[N, H, W, C\]'):
        data.to_model_input(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match='1 or 3 channels'):
        data.to_model_input(np.zeros((1, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match='shape'):
        data.normalize(np.zeros((1, 4, 4, 3)), [0.5], [0.2])


@needs_data
def test_channel_stats_cached_and_prepare_normalises(cache_dir):
    mean, std = data.channel_stats('gtsrb', cache_dir=cache_dir)
    files = os.listdir(cache_dir)
    assert 'stats_gtsrb_32px_3ch.json' in files
    record = json.loads(open(os.path.join(cache_dir, 'stats_gtsrb_32px_3ch.json')).read())
    np.testing.assert_allclose(record['mean'], mean, rtol=1e-6)
    assert mean.shape == std.shape == (3,) and np.all(std > 0.1)
    prepared = data.prepare('gtsrb', 'train', cache_dir=cache_dir)
    assert prepared.images.shape == (12330, 32, 32, 3) and prepared.images.dtype == np.float32
    pixels = prepared.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(pixels.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(pixels.std(0), 1.0, atol=1e-4)
    assert data.prepare('gtsrb', 'train', cache_dir=cache_dir) is prepared  # in-memory cache


# -------------------------------------------------------------------------------- splits

def test_gtsrb_and_cifar100_splits():
    for split, sizes, n in ((data.gtsrb_split(0), (25, 6, 12), 43),
                            (data.cifar100_split(0), (64, 16, 20), 100)):
        parts = (split.meta_train, split.meta_val, split.unseen)
        assert tuple(map(len, parts)) == sizes
        assert sorted(sum(parts, ())) == list(range(n))  # disjoint and complete
        assert json.loads(json.dumps(split.to_dict()))['unseen'] == list(split.unseen)
    assert data.gtsrb_split(0) == data.gtsrb_split(0)
    assert data.gtsrb_split(0).unseen != data.gtsrb_split(1).unseen


@needs_data
def test_omniglot_split_holds_out_whole_alphabets():
    split = data.omniglot_split(seed=0)
    names = data.load_split('omniglot', 'train').class_names
    assert set(split.meta_train) | set(split.meta_val) == set(range(964))
    assert split.unseen == tuple(range(964, 1623))
    alphabet = lambda ids: {names[c].split('/')[0] for c in ids}
    assert len(alphabet(split.meta_val)) == 5
    assert not alphabet(split.meta_val) & alphabet(split.meta_train)
    assert data.omniglot_split(seed=1).meta_val != split.meta_val


def test_inter_split():
    split = data.inter_split()
    assert split.held_out == 'cifar10'
    assert split.sources == ('omniglot', 'gtsrb', 'fashion_mnist')
    with pytest.raises(ValueError, match='cifar100'):
        data.inter_split('cifar100')


# ------------------------------------------------------------------------------- sampler

@pytest.fixture(scope='module')
def omniglot_sampler(cache_dir):
    if not _HAVE_DATA:
        pytest.skip('no npz data')
    pools = data.meta_train_pools('intra', 'omniglot', cache_dir=cache_dir)
    return data.TaskSampler(pools, way=(5, 20), shots=5, queries=3, tasks_per_batch=4, seed=7)


def test_sampler_shapes_masks_and_label_remapping(omniglot_sampler):
    s = omniglot_sampler
    batch, info = s.batch(3, return_info=True)
    assert batch['support']['image'].shape == (4, 100, 32, 32, 3)
    assert batch['query']['image'].shape == (4, 60, 32, 32, 3)
    assert batch['support']['image'].dtype == np.float32
    assert batch['support']['label'].dtype == np.int32 and batch['query']['mask'].dtype == bool
    pool = s.pools[0].data
    for t, task in enumerate(info):
        k = len(task['classes'])
        assert 5 <= k <= 20
        for part, per_class in (('support', 5), ('query', 3)):
            mask, label = batch[part]['mask'][t], batch[part]['label'][t]
            assert mask.sum() == k * per_class and mask[:k * per_class].all()
            assert np.array_equal(np.bincount(label[mask], minlength=k), [per_class] * k)
            assert not label[~mask].any() and not batch[part]['image'][t][~mask].any()
        # Rows are the prepared images; labels map back to the original classes.
        idx = task['support_indices']
        np.testing.assert_array_equal(batch['support']['image'][t, :len(idx)], pool.images[idx])
        originals = np.asarray(task['classes'])[batch['support']['label'][t, :len(idx)]]
        np.testing.assert_array_equal(originals, pool.labels[idx])
        assert not set(idx) & set(task['query_indices'])  # support and query are disjoint
    # The class -> label order is random per task.
    orders = [tuple(np.argsort(c)) for _, c in s.task_classes(3)]
    assert len(set(orders)) > 1


def test_meta_training_never_sees_unseen_or_meta_val_classes(omniglot_sampler, cache_dir):
    split = data.omniglot_split(0)
    seen = set()
    for step in range(300):
        for name, classes in omniglot_sampler.task_classes(step):
            assert name == 'omniglot'
            seen.update(classes)
    assert seen <= set(split.meta_train) and len(seen) > 700
    assert omniglot_sampler.pools[0].data.split == 'train'  # evaluation set is the test split
    pools = data.meta_train_pools('intra', 'gtsrb', cache_dir=cache_dir)
    gtsrb = data.TaskSampler(pools, 10, 10, 10, 2, seed=0, augment=True)
    seen = {c for step in range(100) for _, cs in gtsrb.task_classes(step) for c in cs}
    assert seen == set(data.gtsrb_split(0).meta_train)
    assert gtsrb.pools[0].data.split == 'train'  # no test image reaches a task
    assert gtsrb.batch(0)['support']['image'].shape == (2, 100, 32, 32, 3)


def test_sampler_is_deterministic_and_random_access(omniglot_sampler):
    s = omniglot_sampler
    again = data.TaskSampler(s.pools, way=(5, 20), shots=5, queries=3, tasks_per_batch=4,
                             seed=7)
    a, b = s.batch(11), again.batch(11)
    np.testing.assert_array_equal(a['query']['image'], b['query']['image'])
    np.testing.assert_array_equal(a['support']['label'], b['support']['label'])
    assert not np.array_equal(s.batch(12)['support']['label'], a['support']['label'])
    with s.iterate(start_step=9, num_steps=4) as it:
        got = list(it)
    assert len(got) == 4
    for i, batch in enumerate(got):
        np.testing.assert_array_equal(batch['support']['image'], s.batch(9 + i)['support']['image'])


def test_iterate_stops_its_thread_and_reraises(omniglot_sampler):
    it = omniglot_sampler.iterate(0, prefetch=2)
    next(it)
    it.close()
    assert not any(t.name == 'TaskSampler-prefetch' and t.is_alive()
                   for t in threading.enumerate())

    def failing(step):
        if step == 2:
            raise RuntimeError('boom')
        return step
    with data.PrefetchIterator(failing, 0, None) as it:
        assert [next(it), next(it)] == [0, 1]
        with pytest.raises(RuntimeError, match='boom'):
            next(it)


def test_augment_crops_and_flips():
    x = np.arange(2 * 6 * 6 * 1, dtype=np.float32).reshape(2, 6, 6, 1) + 1
    out = data.augment_images(x, np.random.default_rng(0), flip=False, padding=0)
    np.testing.assert_array_equal(out, x)  # nothing to crop
    flips = data.augment_images(np.repeat(x[:1], 64, 0), np.random.default_rng(0), True, 0)
    mirrored = [np.array_equal(f, x[0, :, ::-1]) for f in flips]
    assert all(m or np.array_equal(f, x[0]) for m, f in zip(mirrored, flips)) and any(mirrored)
    shifted = data.augment_images(x, np.random.default_rng(3), flip=False, padding=2)
    assert shifted.shape == x.shape and set(np.unique(shifted)) <= set(np.unique(x)) | {0}
    # Every output is one 6x6 window of its own zero-padded image (a shift, not a resample or
    # another image's), and over many draws the windows cover every offset in [0, 4]^2.
    many = np.repeat(x, 50, 0)
    crops = data.augment_images(many, np.random.default_rng(4), flip=False, padding=2)
    padded = np.pad(many, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for i, crop in enumerate(crops):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(crop, padded[i, dy:dy + 6, dx:dx + 6])]
        assert len(found) == 1, (i, found)
        offsets.add(found[0])
    assert len(offsets) == 25


def test_class_rotations_are_new_classes_with_rotated_images():
    fake = _fake_prepared(num_classes=3, per_class=4)
    plain = data.TaskSampler([data.ClassPool(fake, (0, 1, 2))], 3, 2, 1, 4, seed=5)
    pool = data.ClassPool(fake, (0, 1, 2), rotations=4)
    assert pool.num_classes == 12
    s = data.TaskSampler([pool], way=12, shots=2, queries=1, tasks_per_batch=4, seed=5)
    seen = set()
    for step in range(5):
        batch, info = s.batch(step, return_info=True)
        for t, task in enumerate(info):
            assert len(task['classes']) == 12  # all 3 x 4 (class, turns) pairs, each once
            assert len(set(zip(task['classes'], task['rotations']))) == 12
            for j, (turns, idx) in enumerate(zip(task['rotations'], task['support_indices'].reshape(12, 2))):
                np.testing.assert_array_equal(batch['support']['image'][t, 2 * j:2 * j + 2],
                                              np.rot90(fake.images[idx], turns, axes=(1, 2)))
                assert (batch['support']['label'][t, 2 * j:2 * j + 2] == j).all()
            seen.update(task['rotations'])
    assert seen == {0, 1, 2, 3}
    _, info = plain.batch(3, return_info=True)  # default: no rotation
    assert all(set(task['rotations']) == {0} for task in info)
    with pytest.raises(ValueError, match='rotations'):
        data.ClassPool(fake, (0, 1), rotations=3)


def test_sampler_validates():
    fake = _fake_prepared(num_classes=3, per_class=4)
    with pytest.raises(ValueError, match='fewer than shots'):
        data.TaskSampler([data.ClassPool(fake, (0, 1, 2))], 3, 3, 2, 1, seed=0)
    with pytest.raises(ValueError, match='no images'):
        data.ClassPool(fake, (0, 5))
    with pytest.raises(ValueError, match='dataset_weights'):
        data.TaskSampler([data.ClassPool(fake, (0, 1))], 2, 1, 1, 1, 0, dataset_weights=[-1])


def test_dataset_weights_pick_one_source_per_task():
    a, b = _fake_prepared(4, 4, name='cifar10'), _fake_prepared(4, 4, name='gtsrb')
    pools = [data.ClassPool(a, (0, 1, 2)), data.ClassPool(b, (0, 1, 2, 3))]
    s = data.TaskSampler(pools, way=10, shots=2, queries=2, tasks_per_batch=8, seed=0,
                         dataset_weights={'gtsrb': 1.0})
    assert {name for name, _ in s.task_classes(0)} == {'gtsrb'}
    s = data.TaskSampler(pools, way=10, shots=2, queries=2, tasks_per_batch=8, seed=0)
    batch, info = s.batch(5, return_info=True)
    assert {t['dataset'] for t in info} == {'cifar10', 'gtsrb'}
    for t, task in enumerate(info):  # way capped at the pool's class count
        assert batch['support']['mask'][t].sum() == 2 * len(task['classes'])


# ---------------------------------------------------------------------------- eval tasks

@needs_data
def test_omniglot_eval_tasks(cache_dir):
    tasks = data.make_eval_tasks('intra', 'omniglot', num_tasks=5, cache_dir=cache_dir)
    unseen = set(data.omniglot_split(0).unseen)
    for task in tasks:
        assert task.num_classes == 20 and set(task.classes) <= unseen
        assert task.support_data.split == task.test_data.split == 'test'
        drawings = task.support_data.extras['drawing']
        assert set(drawings[task.support_indices]) == set(range(1, 16))
        assert set(drawings[task.test_indices]) == set(range(16, 21))
        assert np.array_equal(np.bincount(task.support_labels), [15] * 20)
        assert np.array_equal(np.bincount(task.test_labels), [5] * 20)
        assert task.predict_images.shape == (300, 32, 32, 3)
    again = data.make_eval_tasks('intra', 'omniglot', num_tasks=5, cache_dir=cache_dir)
    assert data.task_manifest(again) == data.task_manifest(tasks)
    json.dumps(data.task_manifest(tasks))
    meta_val = data.make_eval_tasks('intra', 'omniglot', classes='meta_val', num_tasks=3,
                                    cache_dir=cache_dir)
    assert all(set(t.classes) <= set(data.omniglot_split(0).meta_val) for t in meta_val)
    assert meta_val[0].support_data.split == 'train'


@needs_data
def test_float16_storage_keeps_the_float32_contract(cache_dir):
    half = data.prepare('omniglot', 'test', cache_dir=cache_dir, store_dtype=np.float16)
    full = data.prepare('omniglot', 'test', cache_dir=cache_dir)
    assert half.images.dtype == np.float16 and half.images.nbytes * 2 == full.images.nbytes
    np.testing.assert_allclose(half.images[:50], full.images[:50], atol=2e-3, rtol=2e-3)
    pool = data.ClassPool(half, data.omniglot_split(0).unseen[:5])
    batch = data.TaskSampler([pool], 5, 2, 2, 1, seed=0).batch(0)
    assert batch['support']['image'].dtype == np.float32


@needs_data
def test_gtsrb_eval_tasks_and_dataset_batch(cache_dir):
    tasks = data.make_eval_tasks('intra', 'gtsrb', cache_dir=cache_dir)
    assert len(tasks) == 20
    task = tasks[0]
    train = task.support_data
    assert task.num_classes == 10 and set(task.classes) <= set(data.gtsrb_split(0).unseen)
    assert (task.support_data.split, task.test_data.split) == ('train', 'test')
    assert len(task.support_indices) == sum(len(train.class_indices[c]) for c in task.classes)
    assert set(task.predict_indices) <= set(task.support_indices)
    assert np.array_equal(np.bincount(task.predict_labels), [100] * 10)
    batch = task.dataset_batch(max_way=12)
    assert batch['image'].shape == (1200, 32, 32, 3) and batch['mask'].sum() == 1000
    np.testing.assert_array_equal(batch['image'][:1000], task.predict_images)
    val = data.make_eval_tasks('intra', 'gtsrb', classes='meta_val', num_tasks=2,
                               cache_dir=cache_dir)
    assert val[0].num_classes == 6  # only 6 meta-val classes


@needs_data
def test_inter_eval_task_is_the_whole_held_out_dataset(cache_dir):
    (task,) = data.make_eval_tasks('inter', 'cifar10', cache_dir=cache_dir)
    assert task.classes == tuple(range(10))
    assert len(task.support_indices) == 10000 and len(task.test_indices) == 10000
    assert np.array_equal(np.bincount(task.predict_labels), [100] * 10)
    record = task.manifest()
    assert record['support_indices'] == {'all': 10000} and record['test_split'] == 'test'
    pools = data.meta_train_pools('inter', 'fashion_mnist', cache_dir=cache_dir)
    assert [p.name for p in pools] == ['omniglot', 'gtsrb', 'cifar10']
    assert [p.flip for p in pools] == [False, False, True]
    # Rotated classes apply to every source pool (never to the held-out dataset: no pool has it).
    rotated = data.meta_train_pools('inter', 'fashion_mnist', rotations=4, cache_dir=cache_dir)
    assert [p.num_classes for p in rotated] == [4 * p.num_classes for p in pools]


def test_as_dataset_batch_pads_and_validates():
    images = np.ones((6, 4, 4, 3), np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    batch = data.as_dataset_batch(images, labels, max_way=5)
    assert batch['image'].shape == (10, 4, 4, 3) and batch['label'].dtype == np.int32
    assert batch['mask'].tolist() == [True] * 6 + [False] * 4
    assert not batch['image'][6:].any()
    with pytest.raises(ValueError, match='max_way'):
        data.as_dataset_batch(images, labels, max_way=2)


# --------------------------------------------------------------------------- TFDS (mock)

def test_tfds_backend_with_mock_data(tmp_path):
    tfds = pytest.importorskip('tensorflow_datasets')
    data.clear_caches()
    try:
        with tfds.testing.mock_data(num_examples=600, policy=tfds.testing.MockPolicy.USE_CODE):
            train = data.load_split('cifar100', 'train', data_dir=str(tmp_path), backend='tfds')
            assert train.images.shape == (600, 32, 32, 3) and train.num_classes == 100
            assert train.labels.dtype == np.int64 and train.extras['coarse_label'].shape == (600,)
            prepared = data.prepare('cifar100', 'train', data_dir=str(tmp_path),
                                    cache_dir=str(tmp_path / 'cache'), backend='tfds')
            split = data.cifar100_split(0)
            usable = [c for c in split.meta_train if len(prepared.class_indices.get(c, ())) >= 2]
            sampler = data.TaskSampler([data.ClassPool(prepared, usable)], 5, 1, 1, 2, seed=0)
            assert sampler.batch(0)['support']['image'].shape == (2, 5, 32, 32, 3)
            assert all(set(c) <= set(split.meta_train) for _, c in sampler.task_classes(1))
            tasks = data.make_eval_tasks('intra', 'cifar100', num_tasks=2, predict_shots=2,
                                         data_dir=str(tmp_path), backend='tfds',
                                         cache_dir=str(tmp_path / 'cache'))
            assert all(set(t.classes) <= set(split.unseen) and t.num_classes == 10
                       for t in tasks)
            assert tasks[0].test_data.split == 'test'
            omniglot = data.load_split('omniglot', 'test', data_dir=str(tmp_path),
                                       backend='tfds')
            assert omniglot.images.shape[1:] == (105, 105, 1)
            assert data.to_model_input(omniglot.images[:2]).shape == (2, 32, 32, 3)
            assert omniglot.extras['drawing'].min() == 1
    finally:
        data.clear_caches()  # the mock data must not leak into later tests


def _fake_prepared(num_classes, per_class, name='cifar10'):
    labels = np.repeat(np.arange(num_classes), per_class)
    images = np.random.default_rng(0).standard_normal((len(labels), 8, 8, 3)).astype(np.float32)
    return preprocess.PreparedDataset(name, 'train', images, labels,
                                      tuple(map(str, range(num_classes))), {},
                                      np.zeros(3, np.float32), np.ones(3, np.float32))


def test_cross_source_tasks_mix_pools_and_keep_every_image_traceable():
    a, b = _fake_prepared(4, 6, name='fashion_mnist'), _fake_prepared(5, 6, name='gtsrb')
    pools = [data.ClassPool(a, (0, 1, 2, 3), rotations=4), data.ClassPool(b, (0, 1, 2, 3, 4))]
    s = data.TaskSampler(pools, way=12, shots=2, queries=3, tasks_per_batch=6, seed=3,
                         cross_source_prob=1.0)
    batch, info = s.batch(7, return_info=True)
    by_name = {p.name: p for p in pools}
    for t, task in enumerate(info):
        names = task['class_datasets']
        assert task['dataset'] == 'fashion_mnist+gtsrb' and set(names) == set(by_name)
        keys = list(zip(names, task['classes'], task['rotations']))
        assert len(set(keys)) == len(keys) == 12  # distinct classes; 16 + 5 available, slots a pool cannot fill go to the other
        assert sum(n == "gtsrb" for n in names) <= 5  # a pool never gives more than it has
        for part, idx, per in (('support', task['support_indices'], 2),
                               ('query', task['query_indices'], 3)):
            rows = batch[part]
            assert rows['mask'][t].sum() == 12 * per
            np.testing.assert_array_equal(rows['label'][t, :12 * per], np.repeat(np.arange(12), per))
            for j, (name, c, turns) in enumerate(keys):
                pool_data = by_name[name].data
                block = idx[j * per:(j + 1) * per]
                assert set(pool_data.labels[block]) == {c}
                np.testing.assert_array_equal(rows['image'][t, j * per:(j + 1) * per],
                                              np.rot90(pool_data.images[block], turns, axes=(1, 2)))
        for j in range(12):  # support and query of a class never share an image
            assert not set(task['support_indices'][2 * j:2 * j + 2]) & set(
                task['query_indices'][3 * j:3 * j + 3])
    again = s.batch(7)
    np.testing.assert_array_equal(again['support']['image'], batch['support']['image'])
    assert s.task_classes(7) == [(t['dataset'], t['classes']) for t in info]


def test_cross_source_prob_mixes_task_kinds_and_rejects_bad_values():
    a, b = _fake_prepared(4, 4, name='cifar10'), _fake_prepared(4, 4, name='gtsrb')
    pools = [data.ClassPool(a, (0, 1, 2, 3)), data.ClassPool(b, (0, 1, 2, 3))]
    names = [name for step in range(20) for name, _ in data.TaskSampler(
        pools, 6, 1, 1, 4, seed=0, cross_source_prob=0.5).task_classes(step)]
    mixed = sum(n == 'cifar10+gtsrb' for n in names) / len(names)
    assert 0.3 < mixed < 0.7 and set(names) == {'cifar10', 'gtsrb', 'cifar10+gtsrb'}
    with pytest.raises(ValueError, match='cross_source_prob must be'):
        data.TaskSampler(pools, 2, 1, 1, 1, 0, cross_source_prob=1.5)
    with pytest.raises(ValueError, match='at least two pools'):
        data.TaskSampler(pools[:1], 2, 1, 1, 1, 0, cross_source_prob=0.5)


def test_paired_sources_put_even_and_odd_tasks_on_two_distinct_pools():
    """paired_sources: each batch's even tasks share one pool, its odd tasks another; the pair
    varies over steps, covers every ordered pair, and a process's slice (task_offset) draws the
    same tasks as the whole batch does. Refused for one pool, a zero-weight pair, cross-source."""
    names = ('cifar10', 'gtsrb', 'fashion_mnist')
    pools = [data.ClassPool(_fake_prepared(4, 6, name=n), (0, 1, 2, 3)) for n in names]
    whole = data.TaskSampler(pools, 3, 2, 2, tasks_per_batch=4, seed=5, paired_sources=True)
    pairs = set()
    for step in range(30):
        tasks = [name for name, _ in whole.task_classes(step)]
        assert tasks[0] == tasks[2] != tasks[1] == tasks[3], tasks
        pairs.add((tasks[0], tasks[1]))
    assert len(pairs) == 6  # every ordered pair of the 3 pools
    half = data.TaskSampler(pools, 3, 2, 2, tasks_per_batch=2, seed=5, paired_sources=True,
                            task_offset=2)
    np.testing.assert_array_equal(half.batch(3)['query']['image'], whole.batch(3)['query']['image'][2:])
    unpaired = data.TaskSampler(pools, 3, 2, 2, tasks_per_batch=4, seed=5)
    assert any(len({n for n, _ in unpaired.task_classes(s)[::2]}) > 1 for s in range(10))
    for bad in (dict(pools=pools[:1]), dict(pools=pools, dataset_weights=[1, 0, 0]),
                dict(pools=pools, cross_source_prob=0.5)):
        with pytest.raises(ValueError, match='paired_sources needs'):
            data.TaskSampler(way=3, shots=2, queries=2, tasks_per_batch=2, seed=0,
                             paired_sources=True, **bad)


@pytest.mark.parametrize('cross_source_prob', [0.0, 0.5])
def test_source_labels_name_one_pooled_class_whatever_the_task(cross_source_prob):
    """'source_label': one id per (pool, class, rotation) over all pools, the same in every task;
    asking for it leaves the task stream (images, task labels) exactly as it was."""
    a, b = _fake_prepared(4, 6, name='fashion_mnist'), _fake_prepared(5, 6, name='gtsrb')
    pools = [data.ClassPool(a, (0, 1, 2, 3), rotations=4), data.ClassPool(b, (1, 2, 3, 4))]
    kwargs = dict(way=(2, 6), shots=2, queries=3, tasks_per_batch=4, seed=3,
                  cross_source_prob=cross_source_prob)
    plain = data.TaskSampler(pools, **kwargs)
    labelled = data.TaskSampler(pools, **kwargs, source_labels=True)
    assert labelled.num_source_classes == 16 + 4
    assert 'source_label' not in plain.batch(0)['query']
    id_of = {}
    for step in range(12):
        batch, info = labelled.batch(step, return_info=True)
        reference = plain.batch(step)
        for part in ('support', 'query'):
            for key in ('image', 'label', 'mask'):
                np.testing.assert_array_equal(batch[part][key], reference[part][key])
        ids = batch['query']['source_label']
        for t, task in enumerate(info):
            names = task.get('class_datasets', (task['dataset'],) * len(task['classes']))
            per_class = ids[t, :3 * len(task['classes'])].reshape(-1, 3)
            assert (per_class == per_class[:, :1]).all()  # one id per class of the task
            assert (ids[t, 3 * len(task['classes']):] == 0).all()  # padding rows
            for key, sid in zip(zip(names, task['classes'], task['rotations']), per_class[:, 0]):
                assert id_of.setdefault(key, int(sid)) == sid  # the same id in every task
    assert len(set(id_of.values())) == len(id_of)  # distinct classes, distinct ids
    assert set(id_of.values()) <= set(range(20))
    gtsrb_ids = {sid for (name, _, _), sid in id_of.items() if name == 'gtsrb'}
    assert gtsrb_ids and min(gtsrb_ids) >= 16  # pools in order: fashion_mnist 0..15, gtsrb 16..19


def test_source_labels_can_leave_pools_and_rotated_copies_out():
    """source_label_datasets gives ids only to the named pools, source_label_upright only to
    unrotated images (one id per original class); every other query image gets -1, padding stays
    0, and the task stream is the one the sampler draws without source labels."""
    a, b = _fake_prepared(4, 6, name='fashion_mnist'), _fake_prepared(5, 6, name='gtsrb')
    pools = [data.ClassPool(a, (0, 1, 2, 3), rotations=4), data.ClassPool(b, (1, 2, 3, 4))]
    kwargs = dict(way=(2, 4), shots=2, queries=3, tasks_per_batch=4, seed=5)
    plain = data.TaskSampler(pools, **kwargs)
    gtsrb_only = data.TaskSampler(pools, **kwargs, source_labels=True, source_label_datasets=['gtsrb'])
    upright = data.TaskSampler(pools, **kwargs, source_labels=True, source_label_upright=True)
    assert gtsrb_only.num_source_classes == 4 and upright.num_source_classes == 4 + 4
    seen = {'gtsrb_only': {}, 'upright': {}}
    for step in range(16):
        reference = plain.batch(step)
        for name, sampler in (('gtsrb_only', gtsrb_only), ('upright', upright)):
            batch, info = sampler.batch(step, return_info=True)
            np.testing.assert_array_equal(batch['query']['image'], reference['query']['image'])
            ids = batch['query']['source_label']
            for t, task in enumerate(info):
                k = len(task['classes'])
                assert (ids[t, 3 * k:] == 0).all()  # padding rows
                for (c, r), sid in zip(zip(task['classes'], task['rotations']), ids[t, :3 * k:3]):
                    labelled = task['dataset'] == 'gtsrb' if name == 'gtsrb_only' else r == 0
                    if not labelled:
                        assert sid == -1, (name, task['dataset'], c, r)
                        continue
                    assert 0 <= sid < sampler.num_source_classes
                    assert seen[name].setdefault((task['dataset'], c), int(sid)) == sid
    for ids in seen.values():
        assert len(set(ids.values())) == len(ids)  # one id per labelled original class
    assert {d for d, _ in seen['upright']} == {'fashion_mnist', 'gtsrb'}
    with pytest.raises(ValueError, match='source_label_datasets must name'):
        data.TaskSampler(pools, **kwargs, source_labels=True, source_label_datasets=['cifar10'])


@pytest.mark.parametrize('cross_source_prob', [0.0, 1.0])
def test_cap_shots_gives_a_small_pool_fewer_support_images_and_leaves_the_others_alone(cross_source_prob):
    """cap_shots: a pool of 6-image classes with 3 queries gives 3 support images per class (the
    rest of the class's 8 rows padded); a pool that holds the shots draws exactly its uncapped tasks."""
    small, big = _fake_prepared(4, 6, name='omniglot'), _fake_prepared(5, 12, name='gtsrb')
    pools = [data.ClassPool(small, (0, 1, 2, 3)), data.ClassPool(big, (0, 1, 2, 3, 4))]
    with pytest.raises(ValueError, match=r'fewer than shots \+ queries = 11 images \(cap_shots'):
        data.TaskSampler(pools, way=3, shots=8, queries=3, tasks_per_batch=4, seed=0)
    kwargs = dict(way=3, shots=8, queries=3, tasks_per_batch=8, seed=1,
                  cross_source_prob=cross_source_prob)
    capped = data.TaskSampler(pools, cap_shots=True, **kwargs)
    assert capped.pool_shots == [3, 8] and capped.num_support == 3 * 8
    batch, info = capped.batch(2, return_info=True)
    seen_small = False
    for t, task in enumerate(info):
        per = 3 if 'omniglot' in task['dataset'] else 8
        seen_small |= per == 3
        support = batch['support']
        assert support['mask'][t].sum() == len(task['support_indices']) == 3 * per
        np.testing.assert_array_equal(support['label'][t, :3 * per], np.repeat(np.arange(3), per))
        assert not support['mask'][t, 3 * per:].any() and not support['image'][t, 3 * per:].any()
        assert batch['query']['mask'][t].sum() == 9
        for j in range(3):  # support and query of a class never share an image
            assert not (set(task['support_indices'][per * j:per * (j + 1)])
                        & set(task['query_indices'][3 * j:3 * (j + 1)]))
    assert seen_small
    # The big pool alone holds 8 shots: capping changes nothing there.
    alone = dict(kwargs, cross_source_prob=0.0)
    plain = data.TaskSampler(pools[1:], **alone).batch(5)
    np.testing.assert_array_equal(data.TaskSampler(pools[1:], cap_shots=True, **alone).batch(5)['support']['image'],
                                  plain['support']['image'])
    with pytest.raises(ValueError, match='fewer than shots'):  # 6 images, 6 queries: no support left
        data.TaskSampler(pools, way=3, shots=8, queries=6, tasks_per_batch=1, seed=0, cap_shots=True)
