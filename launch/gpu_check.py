"""GPU check, called by launch/gpu_check.sh: predict vs from-scratch time, meta-training steps.

    python launch/gpu_check.py               # on the GPU machine (asserts backend gpu)
    python launch/gpu_check.py --cpu_smoke   # tiny sizes on CPU: checks the script itself

Sections (each guarded: a failure is printed and the next section still runs):
1. devices and backend;
2. jitted predict for resnet18, 10 classes, 500 and 1000 images: compile time, median latency;
3. one epoch of Adam from scratch on resnet18 over 10k images (CIFAR-10's 10k train subset from
   $PUDNET_DATA_DIR or ../shared/data if present, else synthetic; printed), batch
   config.eval.batch_size, compile excluded; then test accuracy;
4. meta-training steps (``pudnet_jax.train_step`` step, configs/intra.py:size=gpu, synthetic task
   batches of the right shapes) with task_loop='vmap' and 'unroll': compile time, step time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402


def log(msg: str = "") -> None:
    print(msg, flush=True)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def section(title):
    def wrap(fn):
        def run(*a, **kw):
            log(f"\n== {title}")
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            except Exception:  # report and go on with the next section
                log(traceback.format_exc())
                log(f"!! section failed: {title}")
                return None
            finally:
                log(f"   ({time.perf_counter() - start:.1f} s)")
        return run
    return wrap


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(target="resnet8", predict_images=(50, 100), scratch_images=256,
                    scratch_test=128, tasks_per_batch=2, way=5, shots=2, queries=2, steps=2,
                    repeats=2)
    return dict(target="resnet18", predict_images=(500, 1000), scratch_images=10_000,
                scratch_test=10_000, tasks_per_batch=8, way=20, shots=5, queries=5, steps=5,
                repeats=10)


def shrink(config) -> None:
    """Tiny hypernetwork for --cpu_smoke."""
    config.hyper.encoder_widths = (8, 16)
    config.hyper.feature_dim = config.hyper.sketch_dim = config.hyper.hidden_dim = 32
    config.hyper.code_rank = 8


@section("predict (jitted, compiled; host batch -> variables, BN pass included)")
def check_predict(args, s) -> dict:
    from configs.common import base_config
    from pudnet_jax.predict import init_hyper_params, make_predict_fn

    config = base_config()
    config.model.target, config.model.num_classes = s["target"], 10
    if args.cpu_smoke:
        shrink(config)
    hyper_params = init_hyper_params(config, jax.random.key(0), 10)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(hyper_params))
    log(f"target {s['target']}, hypernetwork {n_params / 1e6:.3f}M params")
    predict = jax.jit(make_predict_fn(config, 10))
    rng = np.random.default_rng(0)
    out = {}
    for n in s["predict_images"]:
        batch = {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
                 "label": (np.arange(n) % 10).astype(np.int32), "mask": np.ones(n, bool)}
        start = time.perf_counter()
        jax.block_until_ready(predict(hyper_params, batch))
        compile_s = time.perf_counter() - start
        out[n] = median_seconds(lambda: predict(hyper_params, batch), s["repeats"])
        log(f"predict {n:5d} images: {out[n] * 1e3:8.2f} ms median of {s['repeats']} "
            f"(first call incl. compile {compile_s:.1f} s)")
    return out


def load_images(args, s):
    """CIFAR-10 train (10k subset) / test if present, else synthetic; standardised float32."""
    from pudnet_jax import data

    data_dir = os.environ.get("PUDNET_DATA_DIR") or data.default_data_dir()
    try:
        train = data.load_split("cifar10", "train", data_dir, backend="npz")
        test = data.load_split("cifar10", "test", data_dir, backend="npz")
        # Fixed random subsets (the files may be sorted by class); all of it at full size.
        pick = lambda n, m: np.sort(np.random.default_rng(0).permutation(n)[:m])
        i, j = pick(len(train.labels), s["scratch_images"]), pick(len(test.labels), s["scratch_test"])
        x, y, tx, ty = train.images[i], train.labels[i], test.images[j], test.labels[j]
        x, tx = x.astype(np.float32) / 255.0, tx.astype(np.float32) / 255.0
        mean, std = x.mean((0, 1, 2)), x.std((0, 1, 2))
        source = f"CIFAR-10 from {data_dir}"
        return (x - mean) / std, y.astype(np.int32), (tx - mean) / std, ty.astype(np.int32), source
    except (data.DatasetNotFoundError, OSError, ValueError) as e:
        rng = np.random.default_rng(0)
        make = lambda n: (rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
                          rng.integers(0, 10, n).astype(np.int32))
        (x, y), (tx, ty) = make(s["scratch_images"]), make(s["scratch_test"])
        return x, y, tx, ty, f"SYNTHETIC (random images and labels; no CIFAR-10: {type(e).__name__})"


@section("one epoch of Adam from scratch (compile excluded)")
def check_scratch_epoch(args, s) -> float:
    from configs.common import base_config
    from pudnet_jax import baselines

    x, y, tx, ty, source = load_images(args, s)
    batch_size = base_config().eval.batch_size
    log(f"data: {source}; {len(x)} train / {len(tx)} test images; target {s['target']}, "
        f"batch {batch_size}")
    r = baselines.train_from_scratch(s["target"], 10, x, y, tx, ty, lr=1e-3, epochs=1,
                                     batch_size=batch_size, seed=0)
    epoch_s = r["epoch_seconds_cumulative"][1]
    log(f"epoch: {epoch_s:.2f} s ({r['steps_per_epoch']} steps, "
        f"{epoch_s / r['steps_per_epoch'] * 1e3:.1f} ms/step), compile {r['compile_seconds']:.1f} s, "
        f"test accuracy {r['epoch_accuracy'][0]:.3f} -> {r['epoch_accuracy'][1]:.3f} "
        f"(eval {r['eval_seconds']:.1f} s)")
    return epoch_s


def task_batch(config, rng):
    d, size = config.data, config.model.image_size

    def part(rows):
        return {"image": rng.normal(size=(d.tasks_per_batch, rows, size, size, 3)).astype(np.float32),
                "label": np.tile(np.repeat(np.arange(d.way), rows // d.way), (d.tasks_per_batch, 1)).astype(np.int32),
                "mask": np.ones((d.tasks_per_batch, rows), bool)}

    return {"support": part(d.way * d.shots), "query": part(d.way * d.queries)}


@section("meta-training steps (configs/intra.py:size=gpu, synthetic task batches)")
def check_meta_train(args, s) -> dict:
    from configs.intra import get_config
    from pudnet_jax import parallel
    from pudnet_jax.train_step import create_train_state, jit_train_step

    out = {}
    for loop in args.task_loops:
        config = get_config("size=gpu")
        config.train.task_loop = loop
        config.data.tasks_per_batch = s["tasks_per_batch"]
        config.data.way = config.model.num_classes = s["way"]
        config.data.shots, config.data.queries = s["shots"], s["queries"]
        config.model.target = s["target"]
        if args.cpu_smoke:
            shrink(config)
        mesh = parallel.make_mesh()
        try:
            state = jax.device_put(create_train_state(config, jax.random.key(0)), parallel.replicated(mesh))
            step = jit_train_step(config, mesh)
            batch = parallel.shard_batch(task_batch(config, np.random.default_rng(0)), mesh)
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(step(state, batch))
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(s["steps"]):
                start = time.perf_counter()
                state, metrics = jax.block_until_ready(step(state, batch))
                times.append(time.perf_counter() - start)
            out[loop] = float(np.median(times))
            log(f"task_loop={loop:6s}: {out[loop] * 1e3:9.1f} ms/step median of {s['steps']} "
                f"({config.data.tasks_per_batch} tasks x {config.data.way}-way, {config.model.target}; "
                f"first step incl. compile {compile_s:.1f} s; loss {float(metrics['loss']):.3f})")
        except Exception:
            log(traceback.format_exc())
            log(f"!! task_loop={loop} failed")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny sizes; CPU allowed")
    parser.add_argument("--task_loops", nargs="+", default=["vmap", "unroll"])
    args = parser.parse_args()
    t0 = time.perf_counter()
    from pudnet_jax.train import machine_description

    log(f"machine: {machine_description()}")
    log(f"jax.devices(): {jax.devices()}")
    backend = jax.default_backend()
    if not args.cpu_smoke:
        assert backend == "gpu", f"expected the gpu backend, got {backend!r} (use --cpu_smoke on CPU)"
    s = sizes(args.cpu_smoke)
    log(f"mode: {'cpu_smoke (tiny sizes)' if args.cpu_smoke else 'full'}; sizes {s}; seed 0")
    predict = check_predict(args, s)
    epoch = check_scratch_epoch(args, s)
    check_meta_train(args, s)
    if predict and epoch:
        n = max(predict)
        log(f"\nSIDE BY SIDE: predict ({n} images) {predict[n] * 1e3:.2f} ms vs one from-scratch "
            f"epoch ({s['scratch_images']} images) {epoch:.2f} s: epoch / predict = {epoch / predict[n]:.0f}x")
    log(f"total wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
