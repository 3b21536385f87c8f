"""Orbax checkpoints: params, optimizer state, data position and metadata.

A step folder holds four Composite items: `params` and `opt_state`
(`StandardSave`; saved separately so samplers restore params alone), `data`
(JSON: the batch iterator's position) and `meta` (JSON: configs, anything).
Saves are asynchronous: `save()` returns once device arrays are copied to the
host, so the next (donating) train step may run at once; a step becomes
visible only when fully written, so a process killed mid-save leaves the
previous step as the latest one.

Restores go onto an abstract tree whose leaves carry the CURRENT mesh's
shardings, so a checkpoint written on one mesh (or device count) restores on
any other. Shapes are checked against the checkpoint's metadata first and a
mismatch names the parameter. A checkpoint written before the layers were stacked
(one subtree per layer, 'layers/0/attn/q_proj') is read layer by layer and stacked
into the current layout ('layers/attn/q_proj' [L, ...]).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lmsi_jax import fileio
from lmsi_jax import model as model_lib

CHECKPOINT_SUBDIR = "checkpoints"
ARRAY_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("data", "meta")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  h: dict[str, ocp.CheckpointHandler] = {k: ocp.StandardCheckpointHandler() for k in ARRAY_ITEMS}
  h.update({k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS})
  return h


def key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'layers/attn/q_proj' -> shape, for arrays, abstract arrays or Orbax metadata.

  nnx.Variable's `value` level (an attribute in live trees, a dict key in
  metadata) is dropped so both spell a parameter the same way.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[_leaf_name(path)] = tuple(getattr(leaf, "shape", ()))
  return out


_LAYER = re.compile(r"(^|/)layers/(\d+)(/|$)")


def _is_per_layer(tree) -> bool:
  """Whether a tree (or Orbax metadata) holds layers one by one ('layers/0/attn/q_proj', the
  layout before the layers were stacked) rather than stacked ('layers/attn/q_proj' [L, ...])."""
  return any(_LAYER.search(p) for p in flat_shapes(tree))


def _leaf_name(path) -> str:
  """'layers/attn/q_proj' for a tree path (a Variable's trailing 'value' dropped)."""
  parts = [key_str(k) for k in path]
  return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _without_layer(name: str, m: re.Match) -> str:
  """'layers/3/attn/q_proj' (m: its `_LAYER` match) -> 'layers/attn/q_proj'."""
  return name[:m.start(2)] + name[m.end(2) + 1:]


def _stacked_leaves(target) -> dict[str, Any]:
  return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}


def _per_layer_target(saved_md, target):
  """The abstract tree of a per-layer checkpoint (its own structure, from its metadata) with
  each layer's slice of the stacked `target`'s shapes and shardings."""
  stacked = _stacked_leaves(target)

  def one(path, _):
    name = _leaf_name(path)
    m = _LAYER.search(name)
    if m is None:
      return stacked.get(name)
    leaf = stacked.get(_without_layer(name, m))
    if leaf is None:
      return None
    sh = leaf.sharding
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=NamedSharding(
        sh.mesh, P(*tuple(sh.spec)[1:]) if len(sh.spec) else P()))
  return jax.tree_util.tree_map_with_path(one, saved_md)


def _stack_layers(restored, target):
  """A per-layer restored tree -> `target`'s stacked structure (each stacked leaf the
  layers' arrays stacked, on the target's sharding)."""
  flat = {}
  for name, x in _stacked_leaves(restored).items():
    m = _LAYER.search(name)
    key = name if m is None else _without_layer(name, m)
    flat.setdefault(key, {})[0 if m is None else int(m.group(2))] = x
  missing = sorted(set(_stacked_leaves(target)) - set(flat))
  if missing:
    raise ShapeMismatch(f"'{missing[0]}' is not in the checkpoint")

  def one(path, leaf):
    name = _leaf_name(path)
    xs = flat[name]
    if len(xs) == 1 and leaf.shape == getattr(xs[0], "shape", None):
      return xs[0]
    if sorted(xs) != list(range(leaf.shape[0])):
      raise ShapeMismatch(f"'{name}': the checkpoint has layers {sorted(xs)}, "
                          f"the model {leaf.shape[0]}")
    return jax.jit(lambda *a: jax.numpy.stack(a), out_shardings=leaf.sharding)(
        *[xs[i] for i in range(leaf.shape[0])])
  return jax.tree_util.tree_map_with_path(one, target)


class ShapeMismatch(ValueError):
  """A checkpoint that does not fit the model (a config problem, not a damaged file)."""


def check_shapes(saved, target, what: str = "parameter") -> None:
  """Raises ShapeMismatch naming the first path whose shape (or presence) differs."""
  have, want = flat_shapes(saved), flat_shapes(target)
  for path in sorted(set(have) | set(want)):
    if path not in have:
      raise ShapeMismatch(f"{what} '{path}' (shape {want[path]}) is not in the checkpoint")
    if path not in want:
      raise ShapeMismatch(f"checkpoint {what} '{path}' (shape {have[path]}) is not in the model")
    if have[path] != want[path]:
      raise ShapeMismatch(f"{what} '{path}' has shape {have[path]} in the checkpoint but "
                       f"{want[path]} in the model")


def resolve_dir(directory: str) -> str:
  """A checkpoint directory, or a training workdir holding `checkpoints/`."""
  directory = os.path.abspath(directory)
  sub = os.path.join(directory, CHECKPOINT_SUBDIR)
  return sub if os.path.isdir(sub) else directory


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with this project's four items."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 2, async_save: bool = True,
               create: bool = True):
    # gs:// stays a URL (Orbax writes GCS directly: the multi-host workdir on TPU pods).
    self.directory = directory if fileio.is_remote(directory) else os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                        enable_async_checkpointing=async_save,
                                        cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=_handlers())

  def save(self, step: int, params, opt_state=None, data_state: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None) -> bool:
    """Starts an (async) save; False if Orbax declined (e.g. the step already exists)."""
    args = {"params": ocp.args.StandardSave(params)}
    if opt_state is not None:
      args["opt_state"] = ocp.args.StandardSave(opt_state)
    args["data"] = ocp.args.JsonSave(dict(data_state or {}))
    args["meta"] = ocp.args.JsonSave(dict(meta or {}))
    return bool(self._mngr.save(int(step), args=ocp.args.Composite(**args)))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def metadata(self, step: int):
    """Orbax item metadata (shapes/dtypes of params and opt_state) without restoring."""
    return self._mngr.item_metadata(int(step))

  def read_meta(self, step: int) -> dict[str, Any]:
    """The `meta` JSON item of `step` alone."""
    r = self._mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(r["meta"] or {})

  def restore(self, step: int, abstract_params, abstract_opt_state=None) -> dict[str, Any]:
    """Restores onto the shardings carried by the abstract trees.

    Returns {"params", "data", "meta"} (+ "opt_state" when its abstract tree is
    given). Raises ValueError on a shape mismatch, naming the path.
    """
    step = _step(self, step)
    md = self._mngr.item_metadata(step)
    targets = {"params": abstract_params}
    if abstract_opt_state is not None:
      if md.get("opt_state") is None:
        raise ValueError(f"checkpoint step {step} in {self.directory} has no optimizer state")
      targets["opt_state"] = abstract_opt_state
    args = {"data": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
    per_layer = {}                  # items written in the old per-layer layout (layers/0/...)
    for k, target in targets.items():
      what = "parameter" if k == "params" else "optimizer state"
      if _is_per_layer(md[k]) and not _is_per_layer(target):
        per_layer[k] = target
        target = _per_layer_target(md[k], target)
      check_shapes(md[k], target, what)
      args[k] = ocp.args.StandardRestore(target)
    r = self._mngr.restore(step, args=ocp.args.Composite(**args))
    out = {k: _stack_layers(r[k], per_layer[k]) if k in per_layer else r[k] for k in args}
    out["data"], out["meta"] = out["data"] or {}, out["meta"] or {}
    return out

  def restore_latest(self, abstract_params, abstract_opt_state=None,
                     desc: str = "checkpoint") -> tuple[int | None, dict[str, Any] | None]:
    """(step, restored) of the newest step that restores; (None, None) when none does.

    A step that fails to restore (a damaged or half-copied file; not a shape
    mismatch, which is raised) is moved aside to `<directory>.corrupt/<step>`
    (kept for inspection, out of Orbax's way) with one warning line, and the
    next older step is tried.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_params, abstract_opt_state)
      except ShapeMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        older = [s for s in self.all_steps() if s < step]
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        logging.warning("%s: checkpoint step %d in %s is unreadable (%s); moved to %s.corrupt/; "
                        "%s", desc, step, self.directory, why, self.directory,
                        f"falling back to step {older[-1]}" if older else "no older step: "
                        "starting from step 0")
        self._move_aside(step)
    return None, None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.directory + ".corrupt", f"{step}.{int(time.time())}")
      if fileio.is_remote(src):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        tf.io.gfile.rename(src, dst)
      else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self._mngr.reload()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
  """The `meta` item (config JSON, model/train configs) of a step (default: latest)."""
  with _open(directory) as ckpt:
    return ckpt.read_meta(_step(ckpt, step))


def _open(directory: str) -> Checkpointer:
  path = resolve_dir(directory)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  return Checkpointer(path, max_to_keep=None, async_save=False, create=False)


def _step(ckpt: Checkpointer, step: int | None) -> int:
  if step is None:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  if int(step) not in ckpt.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory} "
                            f"(have {ckpt.all_steps()})")
  return int(step)


def restore_params(directory: str, cfg: model_lib.ModelConfig, mesh: Mesh,
                   step: int | None = None) -> model_lib.LM:
  """An LM with params from `directory` (checkpoint dir or workdir), sharded on `mesh`."""
  graphdef, abs_state, _ = model_lib.abstract_model(cfg, mesh)
  with _open(directory) as ckpt:
    params = ckpt.restore(_step(ckpt, step), abs_state)["params"]
  return model_lib.LM(cfg, graphdef, params, mesh)
