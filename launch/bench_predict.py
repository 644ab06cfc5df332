"""Is predict no slower than one train step? Times both on this machine, for resnet8 and resnet18.

    PYTHONPATH=. python launch/bench_predict.py                       # both targets, CPU: ~3 min
    PYTHONPATH=. python launch/bench_predict.py --targets resnet8 --repeats 10

For each target, with the default hypernetwork sizes (``configs/common.base_config()``) and one
10-class batch of 500 random 32x32x3 images:
- the hypernetwork's parameter count (target: <= 5M for resnet18) and the target's;
- predict: ``jax.jit(make_predict_fn(config, 10))``, compiled, median wall time of several calls,
  each from a host numpy batch (host->device transfer and the BatchNorm pass included);
- one Adam train step of the target on the same 500 images (``baselines``' compiled step: train
  mode, BatchNorm statistics updated), median;
- their ratio (target: predict / train step <= 1), and where predict's time goes: the set encoder
  alone, the target's BatchNorm pass alone (one train-mode forward over the batch), and the rest
  (recurrent cell + parameter head + prototype classifier) by difference;
- peak resident memory of the process so far (``ru_maxrss``), machine, seed and wall time.

``--small_map_conv`` also times why the encoder does 3x3 convs on <=2x2 maps as a matmul
(``hypernet/encoder._conv_small_maps_as_matmul``): XLA's conv vs that matmul on a
``[N, S, S, C]`` batch with ``C`` output channels, for S in 1, 2, 4 (4 is not rewritten: the
control), with the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from configs.common import base_config  # noqa: E402
from pudnet_jax import baselines  # noqa: E402
from pudnet_jax.evaluate import init_target  # noqa: E402
from pudnet_jax.hypernet import build_hypernet  # noqa: E402
from pudnet_jax.hypernet.encoder import SetEncoder, _conv_small_maps_as_matmul  # noqa: E402
from pudnet_jax.models import get_target  # noqa: E402
from pudnet_jax.predict import init_hyper_params, make_predict_fn  # noqa: E402
from pudnet_jax.metrics import machine_description  # noqa: E402


def median_seconds(fns: dict, repeats: int) -> dict:
    """Median seconds of each (compiled) function, timed round-robin so that load changes on a
    shared machine hit all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def bench_target(target: str, args) -> dict:
    k, n = args.num_classes, args.num_images
    config = base_config()
    config.model.target, config.model.num_classes = target, k
    config.hyper.encoder_downsample = args.encoder_downsample
    rng = np.random.default_rng(args.seed)
    batch = {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
             "label": (np.arange(n) % k).astype(np.int32), "mask": np.ones(n, bool)}
    row = {"target": target}

    start = time.perf_counter()
    hyper_params = init_hyper_params(config, jax.random.key(args.seed, impl="rbg"), k)
    row["hyper_params"] = count(hyper_params)
    predict = jax.jit(make_predict_fn(config, k))
    variables = jax.block_until_ready(predict(hyper_params, batch))  # compiles
    row["predict_compile_s"] = time.perf_counter() - start
    row["target_params"] = count(variables["params"])

    # Where predict's time goes.
    h = build_hypernet(config, k)
    encoder = SetEncoder(tuple(h.encoder_widths), h.feature_dim, h.sketch_dim, h.encoder_downsample)
    enc = jax.jit(lambda p, x, y, m: encoder.apply(p, x, y, m, k))
    enc_params = {"params": hyper_params["params"]["encoder"]}
    args_enc = (enc_params, batch["image"], batch["label"], batch["mask"])
    jax.block_until_ready(enc(*args_enc))
    stats_target = get_target(target, k, bn_momentum=0.0)
    bn_pass = jax.jit(lambda v, x, m: stats_target.apply(v, x, train=True, mask=m, features_only=True,
                                                         mutable=["batch_stats"]))
    jax.block_until_ready(bn_pass(variables, batch["image"], batch["mask"]))

    # One Adam step of the target on the same batch (fresh init, compiled ahead of time).
    init = init_target(target, k, (32, 32, 3), args.seed)
    state = (init["params"], init["batch_stats"], baselines._init_opt_state(init["params"], 1e-3))
    step, row["train_step_compile_s"] = baselines.compiled_train_step(target, k, state, (n, 32, 32, 3))
    box = [state]

    def one_step():
        box[0], loss = step(box[0], batch["image"], batch["label"], batch["mask"])
        return loss

    one_step()
    row.update({f"{name}_s": t for name, t in median_seconds({
        "predict": lambda: predict(hyper_params, batch),
        "encoder": lambda: enc(*args_enc),
        "bn_pass": lambda: bn_pass(variables, batch["image"], batch["mask"]),
        "train_step": one_step}, args.repeats).items()})
    row["cell_head_rest_s"] = row["predict_s"] - row["encoder_s"] - row["bn_pass_s"]
    row["load_average"] = os.getloadavg()
    row["ratio"] = row["predict_s"] / row["train_step_s"]
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def bench_small_map_conv(args) -> list[dict]:
    """XLA's 3x3 SAME conv vs the encoder's matmul form, on [N, S, S, C] maps (see the docstring)."""
    rng = np.random.default_rng(args.seed)
    n, c = args.num_images, 128
    kernel = rng.normal(size=(3, 3, c, c)).astype(np.float32) / np.sqrt(9 * c)
    dims = ("NHWC", "HWIO", "NHWC")
    rows = []
    for size in (1, 2, 4):
        x = rng.normal(size=(n, size, size, c)).astype(np.float32)
        conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=dims))
        matmul = jax.jit(lambda x, k: _conv_small_maps_as_matmul(
            x, k, (1, 1), "SAME", dimension_numbers=dims))
        gap = float(np.max(np.abs(np.asarray(conv(x, kernel)) - np.asarray(matmul(x, kernel)))))
        t = median_seconds({"conv": lambda: conv(x, kernel), "matmul": lambda: matmul(x, kernel)},
                           max(args.repeats, 20))
        rows.append({"size": size, "conv_s": t["conv"], "matmul_s": t["matmul"], "max_abs_diff": gap})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="*", default=["resnet8", "resnet18"],
                        help="targets to time (none: only --small_map_conv)")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder_downsample", type=int, default=1,
                        help="hyper.encoder_downsample: the set encoder reads images pooled by it")
    parser.add_argument("--small_map_conv", action="store_true",
                        help="also time XLA's 3x3 conv vs the encoder's matmul form on tiny maps")
    args = parser.parse_args()
    t0 = time.perf_counter()
    m = machine_description()
    print(f"machine: {m['cpu']}, {m['cpu_count']} CPUs, backend {m['jax_backend']}, "
          f"devices {m['devices']}, JAX {m['jax_version']}")
    print(f"load average at start {os.getloadavg()[0]:.1f} (other processes share these CPUs: "
          "timings are only as good as the machine is quiet)")
    print(f"seed {args.seed}; batch {args.num_images} images 32x32x3, {args.num_classes} classes; "
          f"median of {args.repeats} calls; default hypernetwork sizes (configs/common.py)")
    for target in args.targets:
        r = bench_target(target, args)
        print(f"\n{target}: hypernetwork {r['hyper_params'] / 1e6:.3f}M params, target "
              f"{r['target_params'] / 1e6:.3f}M params")
        print(f"  predict          {r['predict_s'] * 1e3:9.1f} ms   (compile {r['predict_compile_s']:.1f} s)")
        print(f"    set encoder    {r['encoder_s'] * 1e3:9.1f} ms")
        print(f"    BN pass        {r['bn_pass_s'] * 1e3:9.1f} ms   (one train-mode forward of the target)")
        print(f"    cell+head+rest {r['cell_head_rest_s'] * 1e3:9.1f} ms   (by difference)")
        print(f"  Adam train step  {r['train_step_s'] * 1e3:9.1f} ms   (compile {r['train_step_compile_s']:.1f} s)")
        verdict = "OK" if r["ratio"] <= 1 else "SLOWER than a train step"
        print(f"  predict / train step = {r['ratio']:.3f}  [{verdict}]")
        print(f"  peak RSS so far {r['peak_rss_mb']:.0f} MB; load average (1, 5, 15 min) "
              f"{', '.join(f'{x:.1f}' for x in r['load_average'])} on {os.cpu_count()} CPUs")
    if args.small_map_conv:
        print(f"\n3x3 SAME conv, {args.num_images} x S x S x 128 -> 128 channels, median of "
              f"{max(args.repeats, 20)} calls (S <= 2 is what the encoder rewrites; S = 4 is not)")
        for r in bench_small_map_conv(args):
            rewritten = "matmul form" if r["size"] <= 2 else "not rewritten (same conv)"
            print(f"  S={r['size']}: lax conv {r['conv_s'] * 1e3:7.2f} ms, {rewritten} "
                  f"{r['matmul_s'] * 1e3:7.2f} ms, max |difference| {r['max_abs_diff']:.1e}")
    print(f"\nwall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
