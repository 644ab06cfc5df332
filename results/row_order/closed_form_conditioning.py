"""Session 32, exploratory (decides nothing): does a larger whitening regulariser make the
closed-form discriminant network less sensitive to float summation order, and what does it
cost on the inter sources?

The closed-form discriminant network (``pca_backbone(..., construction='discriminant')``, read
out as predict does) is built from one whole-dataset task of each source (task seed 1, the
inter config's 100 images per class given to predict; ``pca_backbone`` sums the rows in the
order given, so shuffling them is a float-order perturbation), with the discriminant
directions' whitening regulariser ``eps`` (``pca_backbone(discriminant_eps=...)``, as
``hyper.data_layers_discriminant_eps``; 0.1 shipped) and ``tie_break`` (``discriminant.TIE_BREAK``,
0.05 shipped; no config field, set here by wrapping the function the data layers call).
CIFAR-10 is not read. Run from the repo root:

  python results/row_order/closed_form_conditioning.py > results/row_order/closed_form_conditioning.txt
"""

import functools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pudnet_jax import baselines, checkpoints, pca_backbone, train  # noqa: E402
from pudnet_jax.evaluate import init_target, predictions, random_init_seed  # noqa: E402
from pudnet_jax.hypernet import data_layers, discriminant  # noqa: E402
from pudnet_jax.metrics import machine_description, machine_line  # noqa: E402

SETTINGS = [(0.1, 0.05), (0.3, 0.05), (1.0, 0.05), (0.1, 0.2)]  # (eps, tie_break); first = shipped
SOURCES = ["fashion_mnist", "gtsrb"]
SHUFFLES = 3


def main():
    start = time.perf_counter()
    config = checkpoints.read_config(os.path.join(ROOT, "checkpoints", "inter_resnet8"))
    target, stride = config.model.target, int(config.hyper.data_layers_patch_stride)
    tasks = {name: train.source_dataset_tasks(config, name, 1, 1)[0] for name in SOURCES}
    print(f"# {machine_line(machine_description())}; {SHUFFLES} shuffles per task (seeds [7, k]); "
          "accuracy % in the task's own order, then the shuffles; agreement % with the own order")
    for eps, tie_break in SETTINGS:
        data_layers.discriminant_directions = functools.partial(
            discriminant.discriminant_directions, tie_break=tie_break)
        pca_backbone._pca_backbone_jit.cache_clear()  # re-trace with this setting
        for name, task in tasks.items():
            batch = task.dataset_batch()
            random = init_target(target, task.num_classes, task.test_images.shape[1:], random_init_seed(config, 0))
            preds = []
            for k in range(SHUFFLES + 1):
                order = np.arange(len(batch["label"])) if k == 0 else np.random.default_rng([7, k]).permutation(len(batch["label"]))
                shuffled = {key: np.asarray(value)[order] for key, value in batch.items()}
                backbone = pca_backbone.pca_backbone(target, random, shuffled["image"], shuffled["mask"],
                                                     shuffled["label"], "discriminant", stride, eps)
                variables = baselines.solved_readout(target, backbone, batch, "ridge", config.hyper.ridge_lambda)
                preds.append(predictions(target, variables, task.test_images, 1000))
            accuracy = [100 * float(np.mean(p == task.test_labels)) for p in preds]
            agreement = [100 * float(np.mean(p == preds[0])) for p in preds[1:]]
            print(f"eps {eps:<4} tie_break {tie_break:<5} {name:<14} accuracy {accuracy[0]:.2f} "
                  f"(shuffled {', '.join(f'{a:.2f}' for a in accuracy[1:])})  agreement min "
                  f"{min(agreement):.2f} ({', '.join(f'{a:.2f}' for a in agreement)})", flush=True)
    print(f"# wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
