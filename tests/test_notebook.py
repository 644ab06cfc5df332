"""launch/colab.ipynb runs headless on CPU, and its exported variables load back identically.

The notebook is executed with nbclient in a fresh kernel with ``PUDNET_NOTEBOOK_SMOKE=1`` (tiny
sizes: a 3-step meta-training run stands in for the shipped predictor when
``checkpoints/inter_resnet8`` is missing) and ``PUDNET_SKIP_INSTALL=1`` (the packages of this
environment). Then the Orbax and msgpack exports it wrote are loaded with the snippet of
docs/export.md. About 60 s of CPU (25 s with a warm compilation cache).
"""

import json
import os

import jax
import numpy as np
import pytest

from pudnet_jax import data

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
DATASET = "cifar10"

_HAVE_DATA = all(os.path.isfile(os.path.join(data.default_data_dir(), f"{n}.npz"))
                 for n in ("omniglot", DATASET))


def _compilation_cache_env() -> dict:
    """The session's persistent compilation cache (tests/conftest.py), for subprocesses: reruns
    read their compiled programs from disk."""
    cache = jax.config.jax_compilation_cache_dir
    return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"} if cache else {}


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory):
    """Runs the whole notebook once; returns its work directory."""
    if not _HAVE_DATA:
        pytest.skip(f"no omniglot/{DATASET} npz in {data.default_data_dir()}")
    work = tmp_path_factory.mktemp("notebook")
    env = {**os.environ, "PUDNET_NOTEBOOK_SMOKE": "1", "PUDNET_SKIP_INSTALL": "1",
           "PUDNET_NOTEBOOK_WORKDIR": str(work), "PUDNET_NOTEBOOK_DATASET": DATASET,
           "PUDNET_CACHE_DIR": str(work / "cache"), "JAX_PLATFORMS": "cpu",
           "MPLBACKEND": "module://matplotlib_inline.backend_inline", **_compilation_cache_env()}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    try:
        client.execute(env=env)  # raises CellExecutionError with the cell's traceback on failure
    finally:
        nbformat.write(notebook, str(work / "colab_executed.ipynb"))  # for a look at the outputs
    outputs = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    return work, outputs


def test_notebook_runs_end_to_end(notebook_workdir):
    work, outputs = notebook_workdir
    assert "PUDNET_SKIP_INSTALL=1" in outputs
    assert "round trips give identical arrays and logits" in outputs
    assert (work / "results.png").is_file()
    if not os.path.isdir(os.path.join(ROOT, "checkpoints", "inter_resnet8")):
        assert "No shipped predictor" in outputs  # the fallback says what it does
        assert (work / "meta_train" / "results.json").is_file()


def test_exported_variables_load_identically_in_both_formats(notebook_workdir):
    """The loader snippet of docs/export.md, on variables the notebook predicted and saved."""
    import flax.serialization
    import orbax.checkpoint as ocp

    from pudnet_jax.models import get_target
    from pudnet_jax.predict import preprocess_images

    output = str(notebook_workdir[0] / "predicted_variables")
    from_orbax = ocp.StandardCheckpointer().restore(os.path.abspath(f"{output}/orbax"))
    with open(f"{output}/variables.msgpack", "rb") as f:
        from_msgpack = flax.serialization.msgpack_restore(f.read())

    assert jax.tree.structure(from_orbax) == jax.tree.structure(from_msgpack)
    assert set(from_msgpack) == {"params", "batch_stats", "preprocess"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_orbax), from_msgpack)

    raw = data.load_split(DATASET, "test").images[:64]
    num_classes = from_msgpack["params"]["Dense_0"]["bias"].shape[0]
    info = json.load(open(f"{output}/info.json"))
    apply = jax.jit(get_target(info["target"], num_classes).apply, static_argnames="train")
    logits = []
    for variables in (from_orbax, from_msgpack):
        x = preprocess_images(raw, image_size=32, channels=3)
        x = (x - np.asarray(variables["preprocess"]["mean"])) / np.asarray(variables["preprocess"]["std"])
        logits.append(np.asarray(apply({"params": variables["params"],
                                        "batch_stats": variables["batch_stats"]}, x, train=False)))
    np.testing.assert_array_equal(logits[0], logits[1])
    assert logits[0].shape == (64, num_classes) and np.isfinite(logits[0]).all()
