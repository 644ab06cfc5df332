"""Meta-training tasks: the batch format and the random-access `TaskSampler`.

Batch format (the contract with the model code). A task is

    {'support': {'image': f32[Ns,H,W,C], 'label': i32[Ns], 'mask': bool[Ns]},
     'query':   {'image': f32[Nq,H,W,C], 'label': i32[Nq], 'mask': bool[Nq]}}

with Ns = max_way * shots and Nq = max_way * queries fixed, so one compiled step serves tasks
of any way K <= max_way. Labels are 0..K-1 in a random class order per task; rows are
class-major (the S support rows of class 0, then class 1, ...); padding rows have mask False,
label 0 and zero images. A batch of T tasks stacks every array on a leading task axis [T, ...].

With `TaskSampler(source_labels=True)` the query set also has 'source_label': i32[Nq], each
image's class as one id over all the sampler's pools together (pool offset + the class's index in
its pool, rotated copies counted as classes): the labels of the auxiliary supervised loss over
the pooled source classes (`pudnet_jax.source_head`). Ids do not depend on the task.
`source_label_datasets` restricts the ids to some pools and `source_label_upright=True` to the
unrotated images (one id per original class); every other query image gets -1 (no source label).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from pudnet_jax.data import preprocess, splits
from pudnet_jax.data.prefetch import PrefetchIterator

# Whether a horizontal flip keeps an image in its class. Not for Omniglot (a mirrored
# character is another character), GTSRB (mirroring turns "keep left" into "keep right" and
# breaks the text of signs) or SVHN digits; fine for natural images and clothes.
FLIP_PRESERVES_CLASS = {'omniglot': False, 'gtsrb': False, 'svhn': False,
                        'cifar10': True, 'cifar100': True, 'fashion_mnist': True}
CROP_PADDING = 4  # random crop of the zero-padded image (0 = the dataset mean after normalising)


def as_dataset_batch(images: np.ndarray, labels: np.ndarray, max_way: int | None = None,
                     num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Pads a labelled set into the batch format {'image','label','mask'}.

    The row count is `num_rows` if given, else max_way (default: the number of classes K)
    times the largest class count, so sets of the same shots but fewer classes share a shape.
    Labels must already be 0..K-1.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f'expected images [N,H,W,C] and labels [N]; got {images.shape} and '
                         f'{labels.shape}')
    n = len(labels)
    if n and labels.min() < 0:
        raise ValueError('labels must be 0..K-1; got negative labels')
    counts = np.bincount(labels, minlength=1) if n else np.zeros(1, int)
    num_classes = len(counts)
    if max_way is not None and max_way < num_classes:
        raise ValueError(f'max_way={max_way} is smaller than the {num_classes} classes present')
    if num_rows is None:
        num_rows = (max_way or num_classes) * int(counts.max())
    if num_rows < n:
        raise ValueError(f'num_rows={num_rows} cannot hold {n} images')
    batch = _empty_set(num_rows, images.shape[1:])
    batch['image'][:n] = images
    batch['label'][:n] = labels
    batch['mask'][:n] = True
    return batch


def _empty_set(rows: int, image_shape: tuple[int, ...], lead: tuple[int, ...] = ()) -> dict:
    return {'image': np.zeros(lead + (rows, *image_shape), np.float32),
            'label': np.zeros(lead + (rows,), np.int32),
            'mask': np.zeros(lead + (rows,), bool)}


@dataclasses.dataclass(frozen=True, eq=False)
class ClassPool:
    """Classes of one prepared dataset split that meta-training tasks may use.

    flip=None takes FLIP_PRESERVES_CLASS[data.name] (False for unknown datasets).
    rotations=4 makes every class also appear rotated by 90, 180 and 270 degrees as three new
    classes (the usual Omniglot class augmentation: a rotated character is another character),
    so tasks draw from len(classes) * rotations classes.
    """

    data: preprocess.PreparedDataset
    classes: tuple[int, ...]
    flip: bool | None = None
    rotations: int = 1

    def __post_init__(self):
        classes = tuple(int(c) for c in self.classes)
        missing = [c for c in classes if c not in self.data.class_indices]
        if missing or not classes:
            raise ValueError(f'{self.data.name}[{self.data.split}] pool: classes '
                             f'{missing[:10] or "()"} have no images in this split')
        object.__setattr__(self, 'classes', classes)
        if self.rotations not in (1, 2, 4):
            raise ValueError(f'rotations must be 1, 2 or 4 (multiples of 90 degrees); got '
                             f'{self.rotations}')
        if self.rotations > 1 and self.data.images.shape[1] != self.data.images.shape[2]:
            raise ValueError(f'rotations need square images; {self.data.name} has '
                             f'{self.data.images.shape[1:3]}')
        if self.flip is None:
            object.__setattr__(self, 'flip', FLIP_PRESERVES_CLASS.get(self.data.name, False))

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def num_classes(self) -> int:
        """Classes tasks can draw from, rotated copies included."""
        return len(self.classes) * self.rotations


def meta_train_pools(setting: str, dataset: str, *, split_seed: int = 0, rotations: int = 1,
                     exclude: Sequence[str] = (), **prepare_kwargs) -> list[ClassPool]:
    """The class pools for meta-training (docs/protocol.md).

    intra: one pool, the train split of `dataset` restricted to its split's meta_train classes.
    inter: `dataset` is the held-out one; one pool per other dataset, all classes of its train
      split (for Omniglot that is the background set: the evaluation alphabets stay unused).
    rotations: see `ClassPool`; in the inter setting every source pool gets them (a rotated
      sign or garment is a new class to tell apart, as a rotated character is). Only
      meta-training pools are rotated: validation and the held-out dataset never are.
    exclude: inter only, sources left out as well (leave-one-source-out validation).
    prepare_kwargs go to `preprocess.prepare` (data_dir, image_size, channels, cache_dir, ...).
    """
    if setting == 'intra':
        split = splits.class_split(dataset, split_seed, prepare_kwargs.get('data_dir'),
                                   prepare_kwargs.get('backend', 'auto'))
        return [ClassPool(preprocess.prepare(dataset, 'train', **prepare_kwargs),
                          split.meta_train, rotations=rotations)]
    if setting == 'inter':
        pools = []
        sources = [s for s in splits.inter_split(dataset).sources if s not in exclude]
        if not sources:
            raise ValueError(f'no meta-training source left: {list(exclude)} excludes them all')
        for source in sources:
            data = preprocess.prepare(source, 'train', **prepare_kwargs)
            pools.append(ClassPool(data, tuple(data.class_indices), rotations=rotations))
        return pools
    raise ValueError(f"unknown setting {setting!r}; expected 'intra' or 'inter'")


@dataclasses.dataclass(frozen=True)
class _TaskPlan:
    pool: int  # the pool of every class, or CROSS_SOURCE when they come from several pools
    classes: np.ndarray  # original class ids in label order
    rotations: np.ndarray  # per class, quarter turns applied to its images (ClassPool.rotations)
    support: np.ndarray  # [K*S] indices into the pool's dataset, class-major
    query: np.ndarray  # [K*Q]
    class_pools: np.ndarray | None = None  # [K] pool of each class (cross-source tasks only)
    virtual: np.ndarray | None = None  # [K] each class's index among its pool's (rotated) classes
    shots: int = 0  # support images per class of this task (TaskSampler(cap_shots=True): per pool)


CROSS_SOURCE = -1  # _TaskPlan.pool of a task whose classes come from several pools
# Third seed word of a batch's pool-pair draw (paired_sources); task streams use 0..T-1 there.
PAIR_STREAM = 2**32 - 1


class TaskSampler:
    """Random-access sampler of meta-training task batches.

    `batch(step)` is a pure function of (seed, step): task t of a batch uses
    `np.random.default_rng([seed, step, t])`, so a run resumed at step k sees exactly the
    batches of an uninterrupted run. Each task picks ONE pool (by `dataset_weights`), then K
    classes (K uniform in the `way` range, capped at the pool's class count), then shots +
    queries distinct images per class: support and query never share an image.
    With `task_offset=o`, batch(step) holds tasks o..o+T-1 of that stream (task t uses
    `default_rng([seed, step, o + t])`): one process's slice of the global batch.

    `cross_source_prob=p` (several pools only): a task is, with probability p, a cross-source
    task instead: each of its K class slots picks a pool by `dataset_weights`, then the slots of
    a pool take distinct classes of it (so a 60-way task of three pools holds ~20 classes of
    each; slots a pool cannot fill go to the others). Telling a road sign from a
    character and a garment in one task asks for features that are not specific to one source,
    which is what a held-out dataset needs; within-source tasks cap the way at the smallest
    pool's class count. p=0 leaves the task stream exactly as before (no extra draw).

    `source_labels=True` adds the query set's 'source_label' (module docstring); the task stream
    is unchanged (the ids come from draws the sampler makes anyway).

    `cap_shots=True`: a pool whose smallest class cannot hold shots + queries images gives its
    tasks as many support images per class as that class can after the queries (Omniglot's 20
    drawings: 10 shots with 10 queries), instead of raising; the support keeps
    `max_way * shots` rows and the missing ones are padding (mask False). A cross-source task
    takes the smallest cap of its pools. Pools that hold `shots` draw exactly the tasks they
    draw without the cap.

    `paired_sources=True` (several pools, no cross-source tasks): every batch takes two distinct
    pools A and B, drawn by `dataset_weights` from `default_rng([seed, step, PAIR_STREAM])` (so
    every process of a run agrees on them), and task t of the global stream comes from A when t
    is even, from B when it is odd. The cross-source lookahead step (`pudnet_jax.train_step`, the
    `train.lookahead_scale` config) steps on the even tasks and scores the odd ones: a source
    the step never saw.
    """

    def __init__(self, pools: Sequence[ClassPool], way: int | tuple[int, int], shots: int,
                 queries: int, tasks_per_batch: int, seed: int, augment: bool = False,
                 dataset_weights: Sequence[float] | Mapping[str, float] | None = None,
                 task_offset: int = 0, cross_source_prob: float = 0.0, source_labels: bool = False,
                 source_label_datasets: Sequence[str] | None = None,
                 source_label_upright: bool = False, cap_shots: bool = False,
                 paired_sources: bool = False):
        if not pools:
            raise ValueError('TaskSampler needs at least one ClassPool')
        self.pools = tuple(pools)
        ways = (way, way) if np.isscalar(way) else tuple(way)
        if len(ways) != 2 or not 1 <= ways[0] <= ways[1]:
            raise ValueError(f'way must be an int >= 1 or a (min, max) range; got {way}')
        self.min_way, self.max_way = int(ways[0]), int(ways[1])
        for what, value in (('shots', shots), ('queries', queries),
                            ('tasks_per_batch', tasks_per_batch)):
            if int(value) < 1:
                raise ValueError(f'{what} must be >= 1; got {value}')
        self.shots, self.queries = int(shots), int(queries)
        self.tasks_per_batch, self.seed, self.augment = int(tasks_per_batch), int(seed), augment
        if int(task_offset) < 0:
            raise ValueError(f'task_offset must be >= 0; got {task_offset}')
        self.task_offset = int(task_offset)
        self.image_shape = self.pools[0].data.images.shape[1:]
        for pool in self.pools:
            if pool.data.images.shape[1:] != self.image_shape:
                raise ValueError(f'all pools must share one image shape; {pool.name} has '
                                 f'{pool.data.images.shape[1:]}, expected {self.image_shape}')
        # Support images per class of each pool's tasks: `shots`, or with cap_shots what the
        # pool's smallest class holds after the queries.
        self.pool_shots = []
        for pool in self.pools:
            smallest = min(len(pool.data.class_indices[c]) for c in pool.classes)
            shots_here = min(self.shots, smallest - self.queries) if cap_shots else self.shots
            if shots_here < 1 or smallest < shots_here + self.queries:
                short = [c for c in pool.classes
                         if len(pool.data.class_indices[c]) < shots_here + self.queries]
                hint = '' if cap_shots else ' (cap_shots=True, data.train_shots in configs, caps the shots per pool)'
                raise ValueError(f'{pool.name}: classes {short[:10]} have fewer than shots + '
                                 f'queries = {max(shots_here, 1) + self.queries} images{hint}')
            self.pool_shots.append(int(shots_here))
        self.weights = self._normalised_weights(dataset_weights)
        if not 0.0 <= float(cross_source_prob) <= 1.0:
            raise ValueError(f'cross_source_prob must be in [0, 1]; got {cross_source_prob}')
        if cross_source_prob > 0 and len(self.pools) < 2:
            raise ValueError('cross_source_prob > 0 needs at least two pools (the inter setting); '
                             f'got one pool ({self.pools[0].name})')
        self.cross_source_prob = float(cross_source_prob)
        if paired_sources and (len(self.pools) < 2 or self.cross_source_prob > 0
                               or np.count_nonzero(self.weights) < 2):
            raise ValueError('paired_sources needs two or more pools with a positive weight and no '
                             f'cross-source tasks; got pools {[p.name for p in self.pools]}, weights '
                             f'{self.weights.tolist()}, cross_source_prob {self.cross_source_prob}')
        self.paired_sources = bool(paired_sources)
        self.source_labels = bool(source_labels)
        names = [p.name for p in self.pools]
        if source_label_datasets is not None:
            unknown = sorted(set(source_label_datasets) - set(names))
            if unknown or not source_label_datasets:
                raise ValueError(f'source_label_datasets must name some of the pools {names}; '
                                 f'got {list(source_label_datasets)}')
        self._source_labelled = np.array([source_label_datasets is None or n in source_label_datasets
                                          for n in names])
        self.source_label_upright = bool(source_label_upright)
        # Per pool: how many source ids it owns (0 when not labelled) and the first of them.
        self._source_counts = np.array([(len(p.classes) if self.source_label_upright else p.num_classes) * on
                                        for p, on in zip(self.pools, self._source_labelled)])
        self._source_offsets = np.cumsum([0] + self._source_counts.tolist())[:-1]

    @property
    def num_source_classes(self) -> int:
        """The range of 'source_label': the labelled pools' classes (rotated copies included
        unless `source_label_upright`)."""
        return int(self._source_counts.sum())

    def _source_ids(self, plan: _TaskPlan) -> np.ndarray:
        """One id per class of the task (label order); -1 for a class with no source label."""
        pools = plan.class_pools if plan.class_pools is not None else np.full(len(plan.classes), plan.pool)
        rotations = np.array([self.pools[p].rotations for p in pools], np.int64)
        virtual = np.asarray(plan.virtual, np.int64)
        if self.source_label_upright:
            ids = np.where(virtual % rotations == 0, self._source_offsets[pools] + virtual // rotations, -1)
        else:
            ids = self._source_offsets[pools] + virtual
        return np.where(self._source_labelled[pools], ids, -1).astype(np.int32)

    def _normalised_weights(self, weights) -> np.ndarray:
        if weights is None:
            return np.full(len(self.pools), 1.0 / len(self.pools))
        if isinstance(weights, Mapping):
            unknown = set(weights) - {p.name for p in self.pools}
            if unknown:
                raise ValueError(f'dataset_weights names unknown datasets {sorted(unknown)}')
            weights = [weights.get(p.name, 0.0) for p in self.pools]
        w = np.asarray(weights, np.float64)
        if w.shape != (len(self.pools),) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f'dataset_weights must be {len(self.pools)} non-negative numbers '
                             f'(or a name -> weight dict) with a positive sum; got {weights}')
        return w / w.sum()

    @property
    def num_support(self) -> int:
        return self.max_way * self.shots

    @property
    def num_query(self) -> int:
        return self.max_way * self.queries

    def _paired_pool(self, step: int, task: int) -> int | None:
        """paired_sources: the pool of task `task` (global index) of batch `step`; else None."""
        if not self.paired_sources:
            return None
        rng = np.random.default_rng([self.seed, int(step), PAIR_STREAM])
        first = int(rng.choice(len(self.pools), p=self.weights))
        others = np.where(np.arange(len(self.pools)) == first, 0.0, self.weights)
        second = int(rng.choice(len(self.pools), p=others / others.sum()))
        return (first, second)[task % 2]

    def _plan(self, rng: np.random.Generator, pool_index: int | None = None) -> _TaskPlan:
        """One task's draw; ``pool_index`` forces its pool (paired_sources)."""
        if pool_index is None and self.cross_source_prob > 0 and rng.random() < self.cross_source_prob:
            return self._cross_source_plan(rng)
        if pool_index is None:
            pool_index = int(rng.choice(len(self.pools), p=self.weights))
        pool = self.pools[pool_index]
        k = min(int(rng.integers(self.min_way, self.max_way + 1)), pool.num_classes)
        shots = self.pool_shots[pool_index]
        classes, rotations, picks, virtual = self._draw_classes(pool, k, shots, rng)
        return _TaskPlan(pool_index, classes, rotations, picks[:, :shots].ravel(),
                         picks[:, shots:].ravel(), virtual=virtual, shots=shots)

    def _draw_classes(self, pool: ClassPool, k: int, shots: int, rng: np.random.Generator):
        """k distinct classes of `pool`: (original ids [k], quarter turns [k], image picks
        [k, shots+Q], virtual ids [k]: index among the pool's classes with rotated copies)."""
        # choice without replacement returns the classes in random order: that order is the
        # per-task label remapping (label j <-> classes[j]). Class j of the task is (original
        # class, quarter turns) = divmod(virtual id, rotations); with rotations=1 this draws
        # exactly what choosing from `pool.classes` directly did, so old task streams are kept.
        virtual = rng.choice(pool.num_classes, k, replace=False)
        classes = np.asarray(pool.classes)[virtual // pool.rotations]
        rotations = (virtual % pool.rotations) * (4 // pool.rotations)
        picks = np.array([rng.choice(pool.data.class_indices[int(c)], shots + self.queries,
                                     replace=False) for c in classes], dtype=np.int64)
        return classes, rotations, picks.reshape(k, shots + self.queries), virtual  # k=0: [0, S+Q]

    def _cross_source_plan(self, rng: np.random.Generator) -> _TaskPlan:
        capacity = np.array([p.num_classes if w > 0 else 0 for p, w in zip(self.pools, self.weights)])
        k = min(int(rng.integers(self.min_way, self.max_way + 1)), int(capacity.sum()))
        slots = np.zeros(len(self.pools), int)
        for _ in range(k):  # slot by slot, so a full pool's share goes to the others
            open_weights = np.where(slots < capacity, self.weights, 0.0)
            slots[rng.choice(len(self.pools), p=open_weights / open_weights.sum())] += 1
        shots = min((s for s, count in zip(self.pool_shots, slots) if count > 0), default=self.shots)
        drawn = [self._draw_classes(pool, int(count), shots, rng)
                 for pool, count in zip(self.pools, slots)]
        classes, rotations, picks, virtual = (np.concatenate(parts) for parts in zip(*drawn))
        pool_of = np.repeat(np.arange(len(self.pools)), slots)
        order = rng.permutation(len(classes))  # label order: pools interleaved, not in blocks
        picks = picks[order]
        return _TaskPlan(CROSS_SOURCE, classes[order], rotations[order],
                         picks[:, :shots].ravel(), picks[:, shots:].ravel(),
                         class_pools=pool_of[order], virtual=virtual[order], shots=shots)

    def _task_name(self, plan: _TaskPlan) -> str:
        if plan.pool != CROSS_SOURCE:
            return self.pools[plan.pool].name
        return '+'.join(self.pools[i].name for i in sorted(set(plan.class_pools.tolist())))

    def task_classes(self, step: int) -> list[tuple[str, tuple[int, ...]]]:
        """(dataset name, original class ids in label order) of each task of batch `step`; a
        cross-source task's name joins its pools' names with '+' (e.g. 'gtsrb+omniglot')."""
        plans = [self._plan(self._rng(step, t), self._paired_pool(step, self.task_offset + t))
                 for t in range(self.tasks_per_batch)]
        return [(self._task_name(p), tuple(int(c) for c in p.classes)) for p in plans]

    def _rng(self, step: int, task: int) -> np.random.Generator:
        if step < 0:
            raise ValueError(f'step must be >= 0; got {step}')
        return np.random.default_rng([self.seed, int(step), self.task_offset + task])

    def batch(self, step: int, return_info: bool = False):
        """The batch of tasks for `step` (see module docstring for the format).

        With return_info=True, returns (batch, info): info[t] has the task's 'dataset',
        'classes' (original ids in label order) and 'support_indices'/'query_indices' into
        the pool's prepared split (the train split, for pools from meta_train_pools); a
        cross-source task also has 'class_datasets' (each class's pool, in label order).
        """
        t_count = self.tasks_per_batch
        batch = {'support': _empty_set(self.num_support, self.image_shape, (t_count,)),
                 'query': _empty_set(self.num_query, self.image_shape, (t_count,))}
        if self.source_labels:
            batch['query']['source_label'] = np.zeros((t_count, self.num_query), np.int32)
        info = []
        for t in range(t_count):
            rng = self._rng(step, t)
            plan = self._plan(rng, self._paired_pool(step, self.task_offset + t))
            for part, idx, per_class in (('support', plan.support, plan.shots),
                                         ('query', plan.query, self.queries)):
                images = self._task_images(plan, idx, per_class, rng)
                out, n = batch[part], len(idx)
                out['image'][t, :n] = images
                out['label'][t, :n] = np.repeat(np.arange(len(plan.classes)), per_class)
                out['mask'][t, :n] = True
            if self.source_labels:
                batch['query']['source_label'][t, :len(plan.query)] = np.repeat(
                    self._source_ids(plan), self.queries)
            info.append({'dataset': self._task_name(plan),
                         'classes': tuple(int(c) for c in plan.classes),
                         'rotations': tuple(int(r) for r in plan.rotations),
                         'support_indices': plan.support, 'query_indices': plan.query})
            if plan.class_pools is not None:
                info[-1]['class_datasets'] = tuple(self.pools[i].name for i in plan.class_pools)
        return (batch, info) if return_info else batch

    def _task_images(self, plan: _TaskPlan, idx: np.ndarray, per_class: int,
                     rng: np.random.Generator) -> np.ndarray:
        """The (rotated, augmented) images of one part of a task, class-major as `idx`."""
        if plan.pool != CROSS_SOURCE:
            pool = self.pools[plan.pool]
            images = pool.data.images[idx]
            if plan.rotations.any():
                images = _rotate_classes(images, plan.rotations, per_class)
            return augment_images(images, rng, flip=pool.flip) if self.augment else images
        blocks = []
        for j, (pool_index, turns) in enumerate(zip(plan.class_pools, plan.rotations)):
            pool = self.pools[int(pool_index)]
            block = np.rot90(pool.data.images[idx[j * per_class:(j + 1) * per_class]], int(turns),
                             axes=(1, 2))
            blocks.append(augment_images(block, rng, flip=pool.flip) if self.augment else block)
        return np.concatenate(blocks)

    def iterate(self, start_step: int = 0, num_steps: int | None = None,
                prefetch: int = 2) -> PrefetchIterator:
        """Batches start_step, start_step + 1, ... made ahead by a background thread.

        Use as `with sampler.iterate(k) as it: for batch in it: ...` or call `close()`; the
        queue holds at most `prefetch` batches.
        """
        stop = start_step + num_steps if num_steps is not None else None
        return PrefetchIterator(self.batch, start_step, stop, prefetch)


def _rotate_classes(images: np.ndarray, quarter_turns: np.ndarray, per_class: int) -> np.ndarray:
    """Rotates the class-major blocks of `images` ([K*per_class, H, W, C]) by their class's turns."""
    blocks = images.reshape(len(quarter_turns), per_class, *images.shape[1:])
    return np.concatenate([np.rot90(block, int(turns), axes=(1, 2))
                           for block, turns in zip(blocks, quarter_turns)])


def augment_images(images: np.ndarray, rng: np.random.Generator, flip: bool,
                   padding: int = CROP_PADDING) -> np.ndarray:
    """Random crop of the zero-padded images and, if `flip`, random horizontal flips.

    Vectorised: a sliding-window view of the padded images holds every possible crop, and one
    fancy index picks each image's crop.
    """
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy = rng.integers(0, 2 * padding + 1, n)
    dx = rng.integers(0, 2 * padding + 1, n)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
    crops = windows[np.arange(n), dy, dx]  # [n, C, h, w], a copy
    if flip:
        mirrored = rng.random(n) < 0.5
        crops[mirrored] = crops[mirrored, ..., ::-1]
    return np.ascontiguousarray(np.moveaxis(crops, 1, -1))
