"""Fine-tuning: sharded jitted train step, resumable training loop (optimizer: optim.py).

One call of the jitted step is one optimizer step: gradient accumulation is a
`lax.scan` over `grad_accum` micro-batches inside the step (gradients of the
summed token losses are added, then divided by the total target weight, so k
micro-batches equal one big batch). Optimizer state is sharded like the params
(derived from the params' actual shardings). The loss is pluggable:
`loss_fn(logits, batch, ctx) -> (loss_sum, weight_sum[, aux_metrics])`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from lmsi_jax import checkpoint as ckpt_lib
from lmsi_jax import model as model_lib
from lmsi_jax import preemption
from lmsi_jax import sharding
from lmsi_jax import wandb_logger
from lmsi_jax.optim import TrainConfig, learning_rate_schedule, make_optimizer

Batch = Mapping[str, Any]


@struct.dataclass
class LossContext:
  """What a loss function may depend on besides logits and batch."""
  step: jax.Array                                  # int32 scalar: optimizer step (0-based)
  rng: jax.Array                                   # per-step PRNG key
  num_steps: int = struct.field(pytree_node=False, default=0)


LossFn = Callable[[jax.Array, Batch, LossContext], tuple]


def cross_entropy_loss(logits, batch: Batch, ctx: LossContext | None = None):
  """Next-token CE on target tokens: (sum of weighted token losses, sum of weights)."""
  del ctx
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       batch["targets"])
  w = batch["loss_weights"].astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh):
  """Opt-state leaves shaped like their param get its sharding; others are replicated."""
  rep = NamedSharding(mesh, P())
  unbox = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v

  def pick(leaf, p, s):  # keep the opt-state's own structure (Variable or bare leaf)
    sh = unbox(s) if unbox(leaf).shape == unbox(p).shape else rep
    return leaf.replace(sh) if isinstance(leaf, nnx.Variable) else sh
  return optax.tree_map_params(
      tx, pick, jax.eval_shape(tx.init, params), params, param_shardings,
      transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class TrainStep:
  """The compiled pieces for one (model, mesh, TrainConfig, loss_fn); see `make_train_step`."""

  def __init__(self, graphdef, abstract_params, param_shardings, mesh, tcfg: TrainConfig,
               loss_fn: LossFn, frozen_shardings=None):
    self.mesh, self.tcfg, self.loss_fn = mesh, tcfg, loss_fn
    self.tx = make_optimizer(tcfg)
    self.param_shardings = param_shardings
    self.opt_shardings = opt_state_shardings(self.tx, abstract_params, param_shardings, mesh)
    self.abstract_params = _abstract(abstract_params, param_shardings)
    self.abstract_opt_state = _abstract(jax.eval_shape(self.tx.init, abstract_params),
                                        self.opt_shardings)
    self.batch_sharding = sharding.batch_sharding(mesh, 1)
    micro = tcfg.batch_size // tcfg.grad_accum
    if micro % sharding.batch_divisor(mesh):
      raise ValueError(f"train.batch_size={tcfg.batch_size} / train.grad_accum={tcfg.grad_accum}"
                       f" = {micro} rows per micro-batch must be divisible by the mesh's "
                       f"data*fsdp size {sharding.batch_divisor(mesh)}")
    rep = NamedSharding(mesh, P())
    self._init = jax.jit(self.tx.init, out_shardings=self.opt_shardings)
    # LoRA (lora.py): `frozen` = the base weights, an extra input that is never donated.
    frozen = () if frozen_shardings is None else (frozen_shardings,)
    self._step = jax.jit(functools.partial(self._train_step, graphdef),
                         in_shardings=(param_shardings, self.opt_shardings, self.batch_sharding,
                                       rep, *frozen),
                         out_shardings=(param_shardings, self.opt_shardings, rep),
                         donate_argnums=(0, 1))

  def _train_step(self, graphdef, params, opt_state, batch, step, frozen=None):
    tcfg, k = self.tcfg, self.tcfg.grad_accum
    ctx = LossContext(step=step, rng=jax.random.fold_in(jax.random.key(tcfg.seed), step),
                      num_steps=tcfg.num_steps)

    def loss_sum(p, mb):
      args = (mb["tokens"], mb["positions"], model_lib.segment_mask(mb["segment_ids"]))
      if frozen is None:
        logits, _ = model_lib.forward(graphdef, p, *args, remat=tcfg.remat)
      else:    # LoRA: p = the adapters; dropout keys differ from the loss's
        from lmsi_jax import lora  # pylint: disable=g-import-not-at-top
        logits, _ = lora.forward(graphdef, p, frozen, *args, remat=tcfg.remat,
                                 rng=jax.random.fold_in(ctx.rng, 0x10A))
      out = self.loss_fn(logits, mb, ctx)
      return out[0], (out[1], dict(out[2]) if len(out) > 2 else {})

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if k == 1:
      (lsum, (wsum, aux)), grads = grad_fn(params, batch)
    else:
      micro_sh = NamedSharding(self.mesh, P(None, *self.batch_sharding.spec))

      def split(x):  # micro-batch i = rows i, i+k, ...: every device keeps its own rows
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sh)

      def body(carry, mb):
        g_acc, l_acc, w_acc = carry
        (l, (w, a)), g = grad_fn(params, mb)
        g_acc = jax.tree.map(lambda s, x: s + x.astype(jnp.float32), g_acc, g)
        return (g_acc, l_acc + l, w_acc + w), a

      zeros = jax.lax.with_sharding_constraint(
          jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), self.param_shardings)
      (grads, lsum, wsum), aux = jax.lax.scan(
          body, (zeros, jnp.float32(0), jnp.float32(0)), jax.tree.map(split, dict(batch)))
      aux = jax.tree.map(lambda a: a.mean(0), aux)
    denom = jnp.where(wsum > 0, wsum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": lsum / denom, "grad_norm": optax.global_norm(grads),
               "update_norm": optax.global_norm(updates),
               "learning_rate": learning_rate_schedule(tcfg)(step),
               "tokens": jnp.sum(batch["segment_ids"] > 0), "target_weight": wsum, **aux}
    return params, opt_state, metrics

  def init(self, params):
    """Optimizer state, sharded like the params."""
    return self._init(params)

  def put_batch(self, local: Batch) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global arrays sharded over data*fsdp (shape-checked)."""
    rows = len(local["tokens"]) * jax.process_count()
    cols = np.shape(local["tokens"])[1]
    if rows != self.tcfg.batch_size or cols != self.tcfg.seq_len:
      raise ValueError(f"batch is {rows}x{cols} (global rows x tokens) but train.batch_size="
                       f"{self.tcfg.batch_size}, train.seq_len={self.tcfg.seq_len}")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()}

  def __call__(self, params, opt_state, batch: Batch, step: int, frozen=None):
    """One optimizer step: (params, opt_state, metrics). Donates params and opt_state."""
    if isinstance(next(iter(batch.values())), np.ndarray):
      batch = self.put_batch(batch)
    with jax.set_mesh(self.mesh):
      return self._step(params, opt_state, batch, jnp.asarray(step, jnp.int32),
                        *(() if frozen is None else (frozen,)))


@functools.lru_cache(maxsize=16)
def _cached_step(graphdef, treedef, leaves, mesh, tcfg: TrainConfig, loss_fn,
                 frozen=None) -> TrainStep:
  abstract = treedef.unflatten([jax.ShapeDtypeStruct(s, d) for s, d, _ in leaves])
  shardings = treedef.unflatten([sh for _, _, sh in leaves])
  frozen_sh = None if frozen is None else frozen[0].unflatten(list(frozen[1]))
  return TrainStep(graphdef, abstract, shardings, mesh, tcfg, loss_fn, frozen_sh)


def make_train_step(lm: model_lib.LM, tcfg: TrainConfig, loss_fn: LossFn | None = None) -> TrainStep:
  """A (cached) TrainStep using the shardings that `lm.state` actually has (a lora.LoraLM
  trains `lm.state`, its adapters, over its `frozen` base weights)."""
  leaves, treedef = jax.tree.flatten(lm.state)
  info = tuple((tuple(x.shape), x.dtype, x.sharding) for x in leaves)
  key_cfg = dataclasses.replace(tcfg, log_every=1, checkpoint_every=1, max_to_keep=1)
  frozen = getattr(lm, "frozen", None)
  if frozen is not None:
    f_leaves, f_treedef = jax.tree.flatten(frozen)
    frozen = (f_treedef, tuple(x.sharding for x in f_leaves))
  return _cached_step(lm.graphdef, treedef, info, lm.mesh, key_cfg,
                      loss_fn or cross_entropy_loss, frozen)


def _finite(m: Mapping[str, float]) -> bool:
  """Finite loss, gradient and update (so the new params are finite too)."""
  return all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "update_norm"))


def _data_state(batches) -> dict[str, Any]:
  """Every process's iterator position (each reads its own shard), gathered as JSON."""
  if not hasattr(batches, "state"):
    return {}
  mine = json.dumps(batches.state()).encode()
  if jax.process_count() == 1:
    return {"processes": [json.loads(mine)]}
  sizes = multihost_utils.process_allgather(np.array([len(mine)], np.int32)).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(mine)] = np.frombuffer(mine, np.uint8)
  rows = multihost_utils.process_allgather(buf).reshape(len(sizes), -1)
  return {"processes": [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]}


def _restore_data(batches, data: Mapping[str, Any], start: int) -> None:
  if not hasattr(batches, "restore"):
    for _ in range(start):  # no state(): fast-forward
      next(batches)
    return
  states = data.get("processes", [])
  if len(states) != jax.process_count():
    raise ValueError(f"checkpointed data position is from {len(states)} process(es); "
                     f"resuming with {jax.process_count()}")
  batches.restore(states[jax.process_index()])


def summary_writer(logdir: str):
  """A `tensorboardX.SummaryWriter` on `logdir`, imported without importing torch.

  tensorboardX's writer module tries `import torch` when it is imported, only to recognise
  torch tensors; we log Python floats. Where torch is installed but not yet imported, that
  import took 2.8-3.1 s (and torch's memory) of every training process on a 2-core AMD EPYC
  (family 25 model 1); with it blocked, 0.13-0.16 s. A torch already imported is used as is.
  """
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None      # `import torch` raises ImportError, which it catches
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if block and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter(logdir)


def train(lm: model_lib.LM, batches: Iterable[Batch], tcfg: TrainConfig, workdir: str, *,
          config_json: str | None = None, loss_fn: LossFn | None = None,
          desc: str = "train") -> model_lib.LM:
  """Trains to `tcfg.num_steps`, resuming from `workdir` if it has a checkpoint.

  `lm.state` is donated (invalid afterwards); use the returned LM. `batches`
  yields process-local numpy batches; if it has `state()`/`restore()` its
  position is checkpointed (every process's), otherwise it is fast-forwarded
  on resume. A non-finite loss, grad norm or update norm raises
  FloatingPointError before that state is ever saved. If the checkpoint at
  `num_steps` exists, training is skipped and its params are returned.
  """
  step_fn = make_train_step(lm, tcfg, loss_fn)
  frozen = getattr(lm, "frozen", None)    # a lora.LoraLM: lm.state = the adapters
  batches = batches if hasattr(batches, "__next__") else iter(batches)
  done = lambda params: dataclasses.replace(lm, state=params)
  with contextlib.ExitStack() as stack:   # closes bar, writer, then ckpt (waits for saves)
    ckpt = stack.enter_context(ckpt_lib.Checkpointer(
        os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR), max_to_keep=tcfg.max_to_keep))
    start = ckpt.latest_step()
    if start is not None and start > tcfg.num_steps:
      raise ValueError(f"{workdir} has a checkpoint at step {start} beyond "
                       f"train.num_steps={tcfg.num_steps}")
    if start == tcfg.num_steps:
      start, r = ckpt.restore_latest(step_fn.abstract_params, desc=desc)
      if start == tcfg.num_steps:
        logging.info("%s: checkpoint at step %d exists; skipping training", desc, start)
        return done(r["params"])
    meta = {"config": config_json, "model_config": dataclasses.asdict(lm.cfg),
            "train_config": dataclasses.asdict(tcfg)}
    if frozen is not None:
      meta["lora"] = dataclasses.asdict(lm.lora)
    if start is not None:     # the newest step that restores (a damaged one is moved aside)
      start, r = ckpt.restore_latest(step_fn.abstract_params, step_fn.abstract_opt_state, desc)
    if start is None:
      start, params, opt_state = 0, lm.state, step_fn.init(lm.state)
    else:
      params, opt_state = r["params"], r["opt_state"]
      if r["meta"].get("train_config") not in (None, meta["train_config"]):
        logging.warning("%s: resuming with a train config that differs from the checkpoint's",
                        desc)
      _restore_data(batches, r["data"], start)
      logging.info("%s: resumed from step %d", desc, start)

    lead, writer = jax.process_index() == 0, None
    if lead:
      writer = summary_writer(os.path.join(workdir, "tb"))
      stack.callback(writer.close)
    bar = tqdm(total=tcfg.num_steps, initial=start, desc=desc, mininterval=2, disable=not lead,
               file=sys.stderr)
    stack.callback(bar.close)
    last_good = start if start else None
    pending: list[tuple[int, dict]] = []  # dispatched, not yet checked (at most 2)
    t_last = t_window = time.perf_counter()
    tok_window = 0.0

    def check(upto: int) -> None:
      nonlocal t_last, tok_window, t_window
      while pending and pending[0][0] <= upto:
        i, m = pending.pop(0)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        m["tokens_per_s"], t_last = m["tokens"] / max(now - t_last, 1e-9), now
        if not _finite(m):
          good = f"step {last_good} in {ckpt.directory}" if last_good is not None else "none"
          raise FloatingPointError(
              f"{desc}: non-finite loss at step {i} (loss={m['loss']}, grad_norm="
              f"{m['grad_norm']}, update_norm={m['update_norm']}); last good checkpoint: {good}")
        if writer is not None:
          for k, v in m.items():
            writer.add_scalar(f"{desc}/{k}", v, i)
          wandb_logger.log_scalars(desc, m, i)      # no-op without a W&B session
        bar.update(1)
        tok_window += m["tokens"]
        if (i + 1) % tcfg.log_every == 0 or i + 1 == tcfg.num_steps:
          rate, tok_window, t_window = tok_window / max(now - t_window, 1e-9), 0.0, now
          logging.info("%s step %d/%d: loss=%.4f lr=%.3g grad_norm=%.3g tokens/s=%.0f", desc,
                       i + 1, tcfg.num_steps, m["loss"], m["learning_rate"], m["grad_norm"], rate)
          bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

    stack.enter_context(preemption.deferred_stop())
    for i in range(start, tcfg.num_steps):
      batch = step_fn.put_batch(next(batches))
      params, opt_state, metrics = step_fn(params, opt_state, batch, i, frozen)
      pending.append((i, metrics))
      check(i - 1)  # one step behind: the host prepares the next batch while this one runs
      s = i + 1
      stop = preemption.stop_requested()
      if s % tcfg.checkpoint_every == 0 or s == tcfg.num_steps or stop:
        check(i)    # never save a state whose loss was not finite
        if not ckpt.save(s, params, opt_state, _data_state(batches), {**meta, "step": s}):
          raise RuntimeError(f"{desc}: checkpoint save for step {s} was refused by Orbax")
        last_good = s
      if stop:
        preemption.stop_after_save(stop, ckpt, f"{desc} saved a checkpoint at step {s} of "
                                               f"{tcfg.num_steps}")
    check(tcfg.num_steps)
  return done(params)


@functools.lru_cache(maxsize=8)
def _eval_fn(graphdef, mesh):
  def f(params, batch):
    logits, _ = model_lib.forward(graphdef, params, batch["tokens"], batch["positions"],
                                  model_lib.segment_mask(batch["segment_ids"]))
    return cross_entropy_loss(logits, batch)
  return jax.jit(f)


def evaluate_loss(lm: model_lib.LM, batches: Iterable[Batch], num_batches: int) -> float:
  """Mean target-token cross entropy over `num_batches` process-local batches."""
  fn, bsh = _eval_fn(lm.graphdef, lm.mesh), sharding.batch_sharding(lm.mesh, 1)
  it, total, weight = iter(batches), 0.0, 0.0
  with jax.set_mesh(lm.mesh):
    for _ in range(num_batches):
      b = {k: jax.make_array_from_process_local_data(bsh, np.asarray(v))
           for k, v in next(it).items()}
      l, w = jax.device_get(fn(lm.state, b))
      total, weight = total + float(l), weight + float(w)
  return total / max(weight, 1e-9)
