"""Inter-dataset setting: meta-train on tasks from some datasets, predict a whole unseen dataset.

Commands (from the repo root):

  python -m pudnet_jax.main --config=configs/inter.py --workdir=runs/inter_cifar10
  python -m pudnet_jax.main --config=configs/inter.py:fashion_mnist --workdir=runs/inter_fmnist
  python -m pudnet_jax.main --config=configs/inter.py:quick --workdir=/tmp/quick_inter

Arguments: the held-out dataset (cifar10 [default], fashion_mnist, gtsrb, omniglot); ``quick``;
``size=gpu`` (ResNet-18 target). Meta-training draws 5- to 10-way tasks (``data.min_way`` to
``data.way``) from the other datasets; the held-out one is predicted whole from ``predict_shots``
(100) training images per class and scored on its full test split.
"""

from configs.common import apply_size_and_quick, base_config, parse_arg


def get_config(arg=None):
    """Returns the inter-dataset config; see the module docstring for ``arg``."""
    args = parse_arg(arg, positional="held_out", held_out="cifar10", quick=False, size="cpu")
    c = base_config()
    c.data.setting = "inter"
    c.data.held_out = args.held_out
    c.data.dataset = ""
    c.data.way = 10
    c.data.min_way = 5
    c.data.shots = 10
    c.data.queries = 10
    c.data.predict_shots = 100
    c.data.augment = True
    # A whole dataset (100 images per class given to predict): the ridge classifier uses them
    # all, where class means keep one vector per class (RESULTS.md section 1.1).
    c.hyper.classifier = "ridge"
    # Meta-training heads are 10-way; the hypernetwork's parameters do not depend on the class
    # count, so evaluation predicts a head with as many classes as the held-out dataset has.
    c.model.num_classes = c.data.way
    apply_size_and_quick(c, args.size, args.quick)
    return c
