"""Measures how many meta-training tasks per second the TaskSampler makes on this machine.

    python launch/bench_sampler.py                      # all default configs
    python launch/bench_sampler.py --step_time 0.25 --augment --configs omniglot

For each config it times `sampler.batch(step)` in the calling thread and `sampler.iterate()`
with its prefetch thread, and with --step_time S prints how the time to make one batch compares
with a meta-training step of S seconds (a ratio below 1 means the accelerator never waits).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import data  # pylint: disable=g-import-not-at-top
from pudnet_jax.metrics import machine_description  # pylint: disable=g-import-not-at-top

# name -> (setting, dataset, way, shots, queries)
CONFIGS = {
    'omniglot': ('intra', 'omniglot', 20, 5, 5),
    'gtsrb': ('intra', 'gtsrb', 10, 10, 10),
    'inter': ('inter', 'cifar10', 10, 10, 10),  # sources: omniglot, gtsrb, fashion_mnist
}


def bench(name: str, args) -> None:
    setting, dataset, way, shots, queries = CONFIGS[name]
    t0 = time.perf_counter()
    pools = data.meta_train_pools(setting, dataset, split_seed=args.seed)
    prep_s = time.perf_counter() - t0
    sampler = data.TaskSampler(pools, way, shots, queries, args.tasks_per_batch, args.seed,
                               augment=args.augment)
    sampler.batch(0)  # warm-up: first-touch of pages, per-class index tables

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        sampler.batch(step)
    serial_s = (time.perf_counter() - t0) / args.steps

    t0 = time.perf_counter()
    with sampler.iterate(1, num_steps=args.steps, prefetch=args.prefetch) as it:
        for _ in it:
            pass
    iterate_s = (time.perf_counter() - t0) / args.steps

    tasks = args.tasks_per_batch
    print(f'{name:9s} {setting}/{dataset}: {way}-way {shots}-shot {queries}-query, '
          f'{tasks} tasks/batch, augment={args.augment}, pools='
          f'{"+".join(p.name for p in pools)} (prepare {prep_s:.1f} s)')
    print(f'  batch():   {serial_s * 1e3:7.1f} ms/batch  {tasks / serial_s:8.1f} tasks/s')
    print(f'  iterate(): {iterate_s * 1e3:7.1f} ms/batch  {tasks / iterate_s:8.1f} tasks/s')
    if args.step_time:
        print(f'  step_time {args.step_time:.3f} s: batch time / step time = '
              f'{serial_s / args.step_time:.3f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument('--steps', type=int, default=50, help='batches timed per config')
    parser.add_argument('--tasks_per_batch', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--prefetch', type=int, default=2)
    parser.add_argument('--augment', action='store_true')
    parser.add_argument('--step_time', type=float, default=None,
                        help='seconds of one meta-training step, to print the ratio')
    args = parser.parse_args()
    t0 = time.perf_counter()
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, python {platform.python_version()}")
    print(f'seed {args.seed}, data {data.default_data_dir()}, steps {args.steps}')
    for name in args.configs:
        bench(name, args)
    print(f'wall time {time.perf_counter() - t0:.1f} s')


if __name__ == '__main__':
    main()
