"""Checkpointing: one module owns every read and write of model state (Orbax).

Layout of a training workdir::

    DIR/config.json           the run's config (checked against on resume)
    DIR/checkpoints/<step>/   latest train states (params, optimiser state, step), for resume
    DIR/best/<step>/          hypernetwork params with the best meta-val accuracy so far

An *export* (what ``checkpoints/`` in the repo holds, and what ``load_predictor`` reads) is::

    EXPORT/config.json
    EXPORT/hyper_params/      Orbax StandardCheckpointer tree {'params': ...}
    EXPORT/info.json          where the params came from (step, meta-val accuracy, command)

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a write
killed midway leaves the previous checkpoint restorable (``cleanup_tmp_directories`` removes the
debris on the next start).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from pudnet_jax.hypernet.data_layers import RESIDUAL_SCALE
from pudnet_jax.hypernet.discriminant import DISCRIMINANT_EPS
from pudnet_jax.hypernet.ridge import DEFAULT_RIDGE_LAMBDA

# The config sections that define the hypernetwork: its parameter shapes and what the parameters
# mean (the classifier, ridge strength, encoder input). A workdir resumes only under a config that
# agrees on all of them, even those that leave the shapes alone: a resumed run must keep
# optimising the same function. (Warm starts, train.init_from, check shapes only.)
ARCHITECTURE_FIELDS = ("hyper",)
# model.target too: the hypernetwork generates that network's layers (a resumed run that
# silently switched targets would optimise another function).
ARCHITECTURE_MODEL_FIELDS = ("target", "image_size", "channels")


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are there but cannot be read (truncated or missing array files)."""


class StepNotSavedError(FileNotFoundError):
    """A training workdir holds no train state at the requested step."""


class ArchitectureMismatchError(ValueError):
    """A checkpoint was written for a hypernetwork of another shape than the config asks for."""


def upgrade_legacy_config(saved: dict) -> dict:
    """A saved config dict in today's schema (older exports and workdirs stay loadable).

    - ``hyper.prototype_classifier`` (bool, before ``hyper.classifier`` existed): True is
      ``classifier='prototype'``, False the ablation ``classifier='generated'``.
    - ``hyper.encoder_downsample`` (added in session 11): absent means 1 (full resolution).
    - ``hyper.mirror_support`` (session 14): absent means False.
    - ``hyper.stem_pca_components`` (session 19): absent means 0 (the head's own first layer).
    - ``hyper.data_layers`` (session 20): absent means ``'none'`` (the head's kernels as they are).
    - ``hyper.data_layers_patch_stride`` (session 21): absent means 1 (every patch position).
    - ``hyper.data_layers_residual_scale`` (session 21): absent means 0.25 (the constant before).
    - ``hyper.data_layers_normalized_residual`` (session 24): absent means False (free head gain).
    - ``hyper.batchnorm_residual_scale`` (session 28): absent means 1 (the predicted BatchNorm
      offsets as they are).
    - ``hyper.data_layers_discriminant_eps`` (session 32): absent means 0.1 (the constant before).
    - ``train.source_loss_weight`` / ``source_head_learning_rate`` / ``num_source_classes``
      (session 12): absent means no source head.
    - ``train.source_head_datasets`` / ``source_head_upright_only`` (session 15): absent means
      every pool's classes, rotated copies included (the session-12 head).
    - ``train.source_head_standardize`` / ``source_head_warmup_steps`` (session 16): absent means
      raw features and no ramp.
    - ``data.validation_dataset`` (session 21): absent means '' (every source meta-trains on).
    """
    saved = json.loads(json.dumps(saved))
    hyper = saved.get("hyper", {})
    if hyper:
        hyper.setdefault("encoder_downsample", 1)
        hyper.setdefault("mirror_support", False)
        hyper.setdefault("stem_pca_components", 0)
        hyper.setdefault("data_layers", "none")
        hyper.setdefault("data_layers_patch_stride", 1)
        hyper.setdefault("data_layers_residual_scale", RESIDUAL_SCALE)
        hyper.setdefault("data_layers_normalized_residual", False)
        hyper.setdefault("batchnorm_residual_scale", 1.0)
        hyper.setdefault("data_layers_discriminant_eps", DISCRIMINANT_EPS)
    train = saved.get("train", {})
    if train:
        train.setdefault("source_loss_weight", 0.0)
        train.setdefault("source_head_learning_rate", 1e-3)
        train.setdefault("num_source_classes", 0)
        train.setdefault("source_head_datasets", "")
        train.setdefault("source_head_upright_only", False)
        train.setdefault("source_head_standardize", False)
        train.setdefault("source_head_warmup_steps", 0)
    if saved.get("data"):
        saved["data"].setdefault("validation_dataset", "")
    if "prototype_classifier" in hyper and "classifier" not in hyper:
        hyper["classifier"] = "prototype" if hyper.pop("prototype_classifier") else "generated"
        hyper.setdefault("ridge_lambda", DEFAULT_RIDGE_LAMBDA)
    return saved


def architecture_of(config) -> dict:
    """The part of a config a checkpoint's parameter shapes depend on."""
    arch = {k: config[k].to_dict() for k in ARCHITECTURE_FIELDS}
    arch["model"] = {k: config.model[k] for k in ARCHITECTURE_MODEL_FIELDS}
    return json.loads(json.dumps(arch))  # tuples -> lists, so saved and live configs compare


def check_same_architecture(saved: dict, config, where: str,
                            hint: str = "Use a fresh --workdir or a config matching the checkpoint.") -> None:
    """Raises ``ArchitectureMismatchError`` listing the fields that differ (then ``hint``)."""
    saved_arch = architecture_of(ml_collections.ConfigDict(upgrade_legacy_config(saved)))
    live_arch = architecture_of(config)
    diffs = []
    for section in live_arch:
        for key in sorted(set(saved_arch[section]) | set(live_arch[section])):
            a, b = saved_arch[section].get(key), live_arch[section].get(key)
            if a != b:
                diffs.append(f"{section}.{key}: checkpoint {a!r} vs config {b!r}")
    if diffs:
        raise ArchitectureMismatchError(
            f"The checkpoint in {where} was written for another hypernetwork architecture:\n  "
            + "\n  ".join(diffs) + "\n" + hint)


def check_config_matches_checkpoint(config, directory: str) -> None:
    """Refuses to read the checkpoint in ``directory`` under a config whose hypernetwork differs from
    the one in its ``config.json`` (``ArchitectureMismatchError``; nothing to check without one).

    Evaluate, export and benchmark take an optional ``--config``: without this check a field that
    leaves the parameter shapes alone (``hyper.classifier``, ``hyper.data_layers``,
    ``hyper.encoder_downsample``, ...) would silently make them score or export another function
    than the one meta-trained and selected (e.g. ``configs/intra.py:gtsrb`` on the GTSRB export,
    whose encoder reads 2x-downsampled images). Inference-time settings are compared on purpose
    with ``launch/compare_predictors.py --variants``.
    """
    path = os.path.join(directory, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            check_same_architecture(json.load(f), config, directory, hint=(
                "Omit --config to use the checkpoint's own config.json, or set these fields to "
                "its values; to score a predictor under other inference-time settings, use "
                "launch/compare_predictors.py --variants."))


def write_config(config, workdir: str) -> None:
    """Writes ``config.json``; if one exists, first checks that the architecture matches it."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            check_same_architecture(json.load(f), config, workdir)
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(tmp, path)


def read_config(directory: str) -> ml_collections.ConfigDict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Directory {directory!r} does not exist: expected a pudnet_jax "
                                "workdir or export holding config.json.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No config.json in {directory!r}: not a pudnet_jax workdir or export.")
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged; restore it from "
                         "the run or the export it came from.") from e
    missing = [s for s in ("model", "hyper", "data", "train")
               if not isinstance(saved, dict) or not isinstance(saved.get(s), dict)]
    if missing:
        raise ValueError(f"{path} lacks the config section(s) {missing}: not a pudnet_jax config, "
                         "or a damaged one.")
    return ml_collections.ConfigDict(upgrade_legacy_config(saved))


def _manager(directory: str, max_to_keep: int | None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False,  # a step is seconds long; sync saves keep resume simple
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _stored_tree(state_dir: str) -> dict:
    """The tree structure (as nested dicts of array metadata) of a saved state, read from disk."""
    with ocp.StandardCheckpointer() as checkpointer:
        return dict(checkpointer.metadata(state_dir).item_metadata.tree)


def _restore_state(manager: ocp.CheckpointManager, where: str, step: int,
                   abstract_state: Any) -> tuple[Any, dict]:
    """The train state and metadata of ``step``, in ``abstract_state``'s structure and shardings.

    States written before ``TrainState.source_head`` existed (session 12) restore with no source
    head. A run that adds or drops the source head in a workdir whose checkpoints have the other
    form is refused with a ``ValueError`` saying so.
    """
    stored = _stored_tree(os.path.join(os.fspath(manager.directory), str(step), "state"))
    head_stored = stored.get("source_head") is not None
    head_wanted = getattr(abstract_state, "source_head", None) is not None
    if head_stored != head_wanted:
        raise ValueError(
            f"The checkpoint at step {step} in {where!r} was written "
            f"{'with' if head_stored else 'without'} a source head, but the config asks "
            f"{'for one' if head_wanted else 'for none'} (train.source_loss_weight). Resume with "
            "the workdir's own setting, or start a new workdir warm-started from this one "
            "(train.init_from).")
    legacy = "source_head" not in stored
    # A legacy state restores field by field as a dict (its metadata tree is one).
    target = {k: getattr(abstract_state, k) for k in stored} if legacy else abstract_state
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = abstract_state.replace(**restored.state) if legacy else restored.state
    return state, dict(restored.meta)


class RunCheckpoints:
    """Latest train states (for resume) and the best hypernetwork params (for evaluation)."""

    def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
        """``read_only`` (for evaluating a workdir, possibly while its run is still writing):
        creates nothing and leaves Orbax's temporary directories alone, where a writer's
        start-up removes them as debris of a killed save."""
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, "checkpoints"), keep, read_only)
        # No automatic retention for best/: a new best must not delete the previous one before a
        # train state records it (see ``save``), or a resume that discards the newer best (it is
        # ahead of the restored state) would leave best/ empty.
        self.best = _manager(os.path.join(workdir, "best"), None, read_only)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves the train state with JSON metadata (e.g. the best meta-val accuracy so far), then
        drops the best params this state no longer needs.

        best/ keeps the newest best at or before ``step`` (the one ``meta`` names) and any newer
        one; older bests are deleted only now, once a saved state no longer refers to them. So
        whatever moment a run is killed at, the best that its last saved state refers to is on
        disk (``discard_best_after`` removes only bests newer than that state).
        """
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.latest.wait_until_finished()
        covered = [s for s in self.best.all_steps() if s <= step]
        for older in sorted(covered)[:-1]:
            self.best.delete(older)

    def restore(self, abstract_state: Any) -> tuple[Any, dict]:
        """Restores the latest state into ``abstract_state``'s structure and shardings."""
        return _restore_state(self.latest, self.workdir, self.latest.latest_step(), abstract_state)

    def discard_best_after(self, step: int) -> None:
        """Deletes best params saved after ``step`` (call on resume from ``step``).

        A run killed between a best save and its next regular checkpoint leaves a best step
        newer than the state it resumes from. The resumed run validates that step again (to the
        same accuracy: resume is exact) and saves it again, which Orbax refuses for an existing
        step; dropping it first also keeps best/ consistent with the restored metadata, whose
        best step is still on disk (``save`` deletes a best only once a newer one is recorded in
        a saved state).
        """
        for newer in [s for s in self.best.all_steps() if s > step]:
            self.best.delete(newer)

    def save_best(self, step: int, hyper_params: Any, meta: dict) -> None:
        self.best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(hyper_params), meta=ocp.args.JsonSave(meta)), force=True)
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _strict_abstract(tree):
    """Restore targets with a sharding: Orbax then restores jax Arrays and refuses a stored shape
    that differs from the target's. Without one it restores NumPy arrays and silently pads or
    truncates them, so a checkpoint of another architecture would load as garbage parameters."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_hyper_params(directory: str, config, step: int | None = None) -> tuple[Any, dict]:
    """Hypernetwork params from an export or a workdir (best, else latest).

    ``step`` (training workdirs only) reads the train state saved at that step instead, e.g. to
    score a run's checkpoints one by one (``launch/selection_signals.py``; keep them with
    ``train.keep_checkpoints``). Returns ``(hyper_params, info)``. Raises ``FileNotFoundError`` if
    nothing (or not that step) is there and ``ArchitectureMismatchError`` if the checkpoint's
    shapes do not fit ``config``.
    """
    from pudnet_jax.predict import init_hyper_params

    abstract = _strict_abstract(jax.eval_shape(lambda: init_hyper_params(config, jax.random.key(0))))
    export_dir = os.path.join(directory, "hyper_params")
    if step is not None and os.path.isdir(export_dir):
        raise ValueError(f"{directory!r} is an export (one set of params); step={step} needs a "
                         "training workdir.")
    try:
        if os.path.isdir(export_dir):
            # Context managers close Orbax's async machinery: an unclosed checkpointer printed
            # 'Event loop is closed' tracebacks at interpreter exit.
            with ocp.StandardCheckpointer() as checkpointer:
                params = checkpointer.restore(os.path.abspath(export_dir), abstract)
            info_path = os.path.join(directory, "info.json")
            info = json.load(open(info_path)) if os.path.exists(info_path) else {}
            return params, info
        # Without a step: the best params, else the latest train state. With one: that train state.
        places = ((("best", "params"), ("checkpoints", "state")) if step is None
                  else (("checkpoints", "state"),))
        for sub, key in places:
            path = os.path.join(directory, sub)
            if not os.path.isdir(path):
                continue
            with _manager(path, 1, read_only=True) as manager:
                if step is not None and step not in manager.all_steps():
                    raise StepNotSavedError(f"No train state at step {step} in {directory!r}; its "
                                            f"checkpoints/ holds steps {sorted(manager.all_steps())}.")
                at = manager.latest_step() if step is None else step
                if at is None:
                    continue
                if key == "params":
                    restored = manager.restore(at, args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                    return restored.params, {"step": at, "source": "best", **dict(restored.meta)}
                from pudnet_jax.train_step import create_train_state

                # The train state's shape beyond the params (the source head) is the run's own:
                # build it from the workdir's config.json when there is one.
                state_config = config
                if os.path.exists(os.path.join(directory, "config.json")):
                    state_config = config.copy_and_resolve_references()
                    state_config.train = read_config(directory).train
                abstract_state = _strict_abstract(
                    jax.eval_shape(lambda: create_train_state(state_config, jax.random.key(0))))
                state, _ = _restore_state(manager, path, at, abstract_state)
                return state.params, {"step": at, "source": "latest" if step is None else "saved"}
    except (ArchitectureMismatchError, StepNotSavedError, MemoryError):
        raise
    except (ValueError, KeyError) as e:
        raise ArchitectureMismatchError(
            f"Could not restore the hypernetwork from {directory!r} under its config (does the "
            f"config's hyper section, model.target, model.image_size and model.channels match "
            f"the checkpoint's?): {e}") from e
    except Exception as e:  # Orbax/TensorStore read failures: a missing or truncated array file
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CorruptCheckpointError(
            f"The checkpoint in {directory!r} could not be read: an array file is missing or "
            f"damaged ({type(e).__name__}: {first_line}). Copy the directory again from where it "
            "came from (for the committed exports: git checkout -- checkpoints/).") from e
    raise FileNotFoundError(f"No hypernetwork checkpoint in {directory!r}: expected hyper_params/ "
                            "(an export) or best/ or checkpoints/ (a training workdir).")


def saved_steps(workdir: str) -> list[int]:
    """The steps whose train states a training workdir's ``checkpoints/`` holds, ascending."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    with _manager(path, 1, read_only=True) as manager:
        return sorted(manager.all_steps())


def export_predictor(hyper_params: Any, config, directory: str, info: dict) -> None:
    """Writes an export (config, params only, provenance) that ``load_predictor`` reads."""
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.path.join(directory, "hyper_params")),
                          jax.device_get(hyper_params), force=True)
        checkpointer.wait_until_finished()
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    # What the params were meta-trained to predict: the hypernetwork's shapes do not depend on
    # it, so a config.json edited to another target or input would otherwise load silently.
    info = {**info, "meta_trained_for": {f: config.model[f] for f in ARCHITECTURE_MODEL_FIELDS}}
    with open(os.path.join(directory, "info.json"), "w") as f:
        json.dump(info, f, indent=2)


def check_meta_trained_for(directory: str, config) -> None:
    """Raises ``ArchitectureMismatchError`` if the export in ``directory`` records (in
    ``info.json``, since session 31) a target or input other than ``config.model``'s."""
    info_path = os.path.join(directory, "info.json")
    if not os.path.exists(info_path):
        return
    with open(info_path) as f:
        recorded = json.load(f).get("meta_trained_for") or {}
    changed = [f"model.{f}: meta-trained for {recorded[f]!r}, config {config.model[f]!r}"
               for f in ARCHITECTURE_MODEL_FIELDS if f in recorded and recorded[f] != config.model[f]]
    if changed:
        raise ArchitectureMismatchError(
            f"The export in {directory!r} was meta-trained to predict another network than its "
            f"config.json describes ({'; '.join(changed)}). The hypernetwork's shapes allow it, "
            "but its predictions would be for a network it never saw: restore config.json, or "
            "meta-train for that target (train.init_from can warm-start from this export).")


def load_predictor(path: str | os.PathLike):
    """See ``pudnet_jax.predict.load_predictor``."""
    from pudnet_jax.predict import Predictor

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Predictor path {path!r} does not exist or is not a directory.")
    config = read_config(path)
    check_meta_trained_for(path, config)
    params, _ = restore_hyper_params(path, config)
    return Predictor(config=config, hyper_params=params)
