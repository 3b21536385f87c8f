"""LoRA fine-tuning: qwix adapters on the projection weights, merged for sampling.

Config `train.lora` (rank 0 = off, full fine-tuning):
  rank     adapter rank r
  targets  which weights get an adapter: short names q, k, v, o, gate, up, down, the weight
           names (q_proj, ...), or regexes fully matching a weight path such as
           `layers/3/attn/q_proj`
  alpha    the update is W + (alpha / r) * A @ B
  dropout  dropout on the adapter's input (training only)

The adapters come from qwix (`qwix.LoraProvider`, as google/tunix uses it): qwix
intercepts the model's einsum / dot_general calls, creates `<weight>_lora_a` /
`<weight>_lora_b` as `nnx.LoRAParam`s next to the weight (sharded like it) and adds
x·A·B·(alpha/r). qwix selects by module path and op name only; our q/k/v/o are
weights of one Attention module, so `_Provider` also filters by weight name.
The layers are stacked and scanned, so qwix creates one layer's adapters on a
template Block and `_template` stacks them onto the model's layers ([L, ...],
like the weights): a weight has an adapter in every layer, zero (A = B = 0: no
gradient, so it stays zero) in the layers its targets do not select.

`LoraLM` is an LM whose `state` is only the adapters (what the optimizer, its state
and the checkpoints hold) and whose `frozen` is the base weights (passed to the
train step, never differentiated or donated). `merge` folds the adapters into the
weights: a plain LM for sampling and evaluation, with no per-token adapter cost.
`export_peft` writes a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) for the HF export of the base model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lmsi_jax import model as model_lib
from lmsi_jax import sharding

# Short target names -> the weight names in model.py (module attn or mlp).
ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
PROJECTIONS = tuple(ALIASES.values())
DEFAULT_TARGETS = tuple(ALIASES)
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  alpha: float = 16.0
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets) if isinstance(
        self.targets, (list, tuple)) else self.targets)
    def bad(key, msg):
      raise ValueError(f"train.lora.{key}={getattr(self, key)!r}: {msg}")
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
      bad("rank", "expected an int >= 0 (0 = off: full fine-tuning)")
    if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
        or not 0 < self.alpha < math.inf):
      bad("alpha", "expected a finite number > 0")
    if (not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool)
        or not 0 <= self.dropout < 1):
      bad("dropout", "expected a number in [0, 1)")
    if (not isinstance(self.targets, tuple) or not self.targets
        or not all(isinstance(t, str) and t for t in self.targets)):
      bad("targets", f"expected a non-empty tuple of names ({', '.join(ALIASES)}) or regexes")
    for t in self.targets:
      if t not in ALIASES and t not in PROJECTIONS:
        try:
          re.compile(t)
        except re.error as e:
          bad("targets", f"{t!r} is neither a name ({', '.join(ALIASES)}) nor a valid regex ({e})")

  @classmethod
  def from_config(cls, d: Mapping[str, Any] | None) -> LoraConfig:
    """From `cfg.train.lora` (ConfigDict or mapping); an unknown key is an error."""
    if d is None:
      return cls()
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
      if k not in names:
        raise ValueError(f"train.lora.{k}: unknown key (expected one of {sorted(names)})")
    return cls(**d)

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def matches(self, path: str) -> bool:
    """Whether the weight at `path` ('layers/3/attn/q_proj') gets an adapter."""
    name = path.rsplit("/", 1)[-1]
    if name not in PROJECTIONS:
      return False
    return any(ALIASES.get(t, t) == name or re.fullmatch(t, path) for t in self.targets)


@functools.lru_cache(maxsize=1)
def _provider_class():
  """qwix.LoraProvider that also filters by weight path (imported lazily: qwix takes ~2 s)."""
  import qwix  # pylint: disable=g-import-not-at-top
  from qwix._src.providers import ptq  # pylint: disable=g-import-not-at-top
  from qwix._src.utils import flax_util  # pylint: disable=g-import-not-at-top

  class Provider(qwix.LoraProvider):

    def __init__(self, lcfg: LoraConfig, num_layers: int):
      # disable_jit: jnp.matmul (the MLP's `@`) is itself jitted; qwix must see its
      # dot_general outside that inner trace to create the adapter variables.
      super().__init__(module_path=".*", rank=lcfg.rank, alpha=float(lcfg.alpha),
                       dropout=float(lcfg.dropout), disable_jit=True)
      self.lcfg, self.num_layers = lcfg, num_layers

    def _targeted(self, rhs) -> bool:
      name = flax_util.find_param(rhs, ptq.WithAux)
      if name is None:
        return False
      if hasattr(flax_util.get_current_module(), name + SUFFIX_A):
        return True                               # the stacked model: adapters already made
      path = "/".join([*map(str, flax_util.get_current_module_path()), name])
      if path.startswith("layers/"):
        return False
      # The one-layer template Block: a weight gets adapters if any layer's is selected.
      return any(self.lcfg.matches(f"layers/{i}/{path}") for i in range(self.num_layers))

    def _get_current_rule_and_op_id(self, op_name, **kw):
      # Dropout only where `forward` was given a key (training); evaluation is deterministic.
      rule, op_id = super()._get_current_rule_and_op_id(op_name, **kw)
      if (isinstance(rule, qwix.LoraRule) and rule.dropout
          and not isinstance(getattr(flax_util.get_current_module(), "qwix_rngs", None),
                             nnx.Rngs)):
        rule = dataclasses.replace(rule, dropout=0.0)
      return rule, op_id

    def einsum(self, einsum_str, *operands, **kwargs):
      if len(operands) == 2 and self._targeted(operands[1]):
        return super().einsum(einsum_str, *operands, **kwargs)
      return ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)

    def dot_general(self, lhs, rhs, *args, **kwargs):
      if self._targeted(rhs):
        return super().dot_general(lhs, rhs, *args, **kwargs)
      return ptq.PtqProvider.dot_general(self, lhs, rhs, *args, **kwargs)

  return Provider


@dataclasses.dataclass
class LoraLM:
  """An LM under training with adapters: `state` = adapters only, `frozen` = base weights.

  `graphdef` is the qwix-wrapped model; `base_graphdef` the plain one (for `merge`).
  """
  cfg: model_lib.ModelConfig
  graphdef: Any
  state: Any
  mesh: Mesh
  frozen: Any
  base_graphdef: Any
  lora: LoraConfig

  def __call__(self, tokens, positions, mask):
    """(logits, None) with the adapters applied (no dropout): jitted, unlike LM's."""
    with jax.set_mesh(self.mesh):
      return _jit_forward(self.graphdef, self.state, self.frozen, tokens, positions, mask)

  def adapter_paths(self) -> list[str]:
    """'layers.0.attn.q_proj' for every adapted weight (per layer)."""
    return sorted(n for s in _by_name(self.state) if s.endswith(SUFFIX_A)
                  for n in _layer_paths(s[:-len(SUFFIX_A)], self.cfg, self.lora))


def _layer_paths(stacked: str, cfg: model_lib.ModelConfig, lcfg: LoraConfig) -> list[str]:
  """'layers.attn.q_proj' -> the per-layer names whose weight the targets select."""
  rest = stacked.split(".", 1)[1]
  return [f"layers.{i}.{rest}" for i in range(cfg.num_layers)
          if lcfg.matches(f"layers/{i}/{rest.replace('.', '/')}")]


@functools.lru_cache(maxsize=16)
def _template(cfg: model_lib.ModelConfig, lcfg: LoraConfig, mesh: Mesh, seed: int):
  """(qwix graphdef, abstract adapter state, adapter shardings, adapter init fn).

  qwix creates the adapters by running the model once; done under eval_shape on a
  1-token input, so nothing is allocated. Adapters are then created on their shards
  with qwix's rule initialisers (A: he_uniform, B: zeros) by a jitted init.
  """
  import qwix  # pylint: disable=g-import-not-at-top
  provider = _provider_class()(lcfg, cfg.num_layers)
  x = jnp.zeros((1, 1, cfg.hidden_size), model_lib.DTYPES[cfg.dtype])
  pos = jnp.zeros((1, 1), jnp.int32)

  def build():
    model = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
    block = qwix.apply_lora_to_model(model_lib.Block(cfg, rngs=nnx.Rngs(0)), provider, x, pos,
                                     model_lib.causal_mask(1), None, 0, rngs=nnx.Rngs(seed))
    for path, var in nnx.iter_graph(block):
      if isinstance(var, nnx.LoRAParam):           # one layer's adapter -> stacked [L, ...]
        owner = functools.reduce(getattr, path[:-1], model.layers)
        stacked = jax.tree.map(lambda a: jnp.zeros((cfg.num_layers,) + a.shape, a.dtype), var)
        setattr(owner, path[-1], nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: "layers"}))
    return qwix.apply_lora_to_model(model, provider, skip_nnx_init=True)

  with nnx.use_eager_sharding(False):
    graphdef, abs_lora, _ = nnx.split(nnx.eval_shape(build), nnx.LoRAParam, ...)
  paths = sorted(_by_name(abs_lora))
  if not paths:
    raise ValueError(f"config.train.lora.targets={lcfg.targets!r}: matches no projection weight "
                     f"of the model (weights are named like layers/0/attn/q_proj, "
                     f"layers/0/mlp/down_proj)")
  shardings = sharding.state_shardings(abs_lora, mesh)
  rule = provider._rules[0]  # pylint: disable=protected-access

  def init(key):
    def one(path, x):
      name = _name(path)
      keys = jax.random.split(jax.random.fold_in(key, paths.index(name)), x.shape[0])
      if not name.endswith(SUFFIX_A):
        return jax.vmap(lambda k: rule.lora_b_initializer(k, x.shape[1:], x.dtype))(keys)
      a = jax.vmap(lambda k: rule.lora_a_initializer(k, x.shape[1:], x.dtype))(keys)
      chosen = set(_layer_paths(name[:-len(SUFFIX_A)], cfg, lcfg))
      on = jnp.asarray([f"layers.{i}.{name.split('.', 1)[1][:-len(SUFFIX_A)]}" in chosen
                        for i in range(x.shape[0])], x.dtype)
      return a * on.reshape((-1,) + (1,) * (a.ndim - 1))   # unselected layers: A = 0
    return jax.tree_util.tree_map_with_path(one, abs_lora)

  return graphdef, abs_lora, shardings, jax.jit(init, out_shardings=shardings)


def apply(lm: model_lib.LM, lcfg: LoraConfig, seed: int = 0) -> LoraLM:
  """`lm` with fresh adapters (B = 0: the same function as `lm`). `lm.state` becomes frozen."""
  if not lcfg.enabled:
    raise ValueError("train.lora.rank=0: LoRA is off")
  graphdef, _, _, init = _template(lm.cfg, lcfg, lm.mesh, seed)
  with jax.set_mesh(lm.mesh):
    adapters = init(jax.random.key(seed))
  return LoraLM(lm.cfg, graphdef, adapters, lm.mesh, lm.state, lm.graphdef, lcfg)


def abstract_adapters(lm: model_lib.LM, lcfg: LoraConfig, seed: int = 0):
  """The adapters' abstract state with shardings (to restore an adapter checkpoint)."""
  _, abs_lora, shardings, _ = _template(lm.cfg, lcfg, lm.mesh, seed)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abs_lora, shardings)


def forward(graphdef, adapters, frozen, tokens, positions, mask, *, rng=None, remat="none"):
  """Training forward with adapters (no KV cache); `rng` feeds LoRA dropout."""
  model = nnx.merge(graphdef, adapters, frozen)
  if rng is not None:
    model.set_attributes(qwix_rngs=nnx.Rngs(dropout=rng), raise_if_not_found=False)
  return model(tokens, positions, mask, None, 0, remat)


_jit_forward = jax.jit(forward, static_argnums=0, static_argnames=("remat",))


def _name(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  if parts and parts[-1] == "value":
    parts = parts[:-1]
  return ".".join(parts)


def _by_name(state) -> dict[str, Any]:
  return {_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _delta(a, b, shape, scale):
  """scale * A·B in the weight's layout: A [in dims..., r], B [r, out dims...]."""
  d = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
  if d.shape != tuple(shape):
    d = d.reshape(shape)   # dot_general adapters flatten the in/out dims
  return d * scale


@functools.lru_cache(maxsize=16)
def _merge_fn(scale: float, treedef, shardings: tuple):
  out_shardings = treedef.unflatten(shardings)

  def merge(adapters, frozen):
    ad = _by_name(adapters)

    def one(path, w):
      name = _name(path)
      if name + SUFFIX_A not in ad:
        return w
      d = jax.vmap(lambda a, b: _delta(a, b, w.shape[1:], scale))(   # per layer
          ad[name + SUFFIX_A], ad[name + SUFFIX_B])
      return (w.astype(jnp.float32) + d).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(one, frozen)
  return jax.jit(merge, out_shardings=out_shardings)


def merge(llm: LoraLM) -> model_lib.LM:
  """A plain LM with W + (alpha/r)·A·B in every adapted weight (same shardings as the base)."""
  leaves, treedef = jax.tree.flatten(llm.frozen)
  fn = _merge_fn(float(llm.lora.scale), treedef, tuple(x.sharding for x in leaves))
  with jax.set_mesh(llm.mesh):
    state = fn(llm.state, llm.frozen)
  return model_lib.LM(llm.cfg, llm.base_graphdef, state, llm.mesh)


def restore(directory: str, lm: model_lib.LM, lcfg: LoraConfig, step: int | None = None,
            seed: int = 0) -> LoraLM:
  """A LoraLM over `lm`'s weights with the adapters of checkpoint `directory` (a workdir or
  its checkpoints/ folder), sharded on `lm.mesh`."""
  from lmsi_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  llm = apply(lm, lcfg, seed)
  abstract = abstract_adapters(lm, lcfg, seed)
  with ckpt_lib._open(directory) as ckpt:  # pylint: disable=protected-access
    params = ckpt.restore(ckpt_lib._step(ckpt, step), abstract)["params"]  # pylint: disable=protected-access
  return dataclasses.replace(llm, state=params)


def _host(x) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export_peft(llm: LoraLM, out_dir: str, *, base_model_name_or_path: str = "",
                dtype: str | None = None) -> str:
  """Writes a PEFT LoRA adapter directory for the HF export of `llm`'s base model.

  adapter_model.safetensors holds `base_model.model.<HF module>.lora_A.weight` [r, in]
  and `.lora_B.weight` [out, r] in HF's [out, in] layout (heads flattened, as
  `export_hf` writes the weights); adapter_config.json says r, lora_alpha, target
  modules. `peft.PeftModel.from_pretrained(hf_base, out_dir)` then computes what the
  merged model does. Every process takes part in the gathers; process 0 writes.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from lmsi_jax.interop import layout  # pylint: disable=g-import-not-at-top
  write = jax.process_index() == 0
  np_dtype = np.dtype(model_lib.DTYPES[dtype or llm.cfg.param_dtype])
  ad, r = _by_name(llm.state), llm.lora.rank
  tensors, modules, gathered = {}, [], {}
  for name in llm.adapter_paths():
    hf_name, _ = layout.hf_entry(name)
    module = hf_name.removesuffix(".weight")
    modules.append(module)
    _, i, rest = name.split(".", 2)
    stacked = f"layers.{rest}"
    if stacked not in gathered:
      gathered[stacked] = (_host(ad[stacked + SUFFIX_A]), _host(ad[stacked + SUFFIX_B]))
    a, b = gathered[stacked][0][int(i)], gathered[stacked][1][int(i)]
    tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
        a.reshape(-1, r).T.astype(np_dtype))
    tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
        b.reshape(r, -1).T.astype(np_dtype))
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  every_layer = len(modules) == len(short) * llm.cfg.num_layers
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path":
      base_model_name_or_path or None, "r": r, "lora_alpha": llm.lora.alpha,
      "lora_dropout": llm.lora.dropout, "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
      # Short names when every layer has the same adapters, else the exact modules.
      "target_modules": short if every_layer else sorted(modules), "modules_to_save": None,
  }
  if write:
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
      f.write("\n")
  multihost_utils.sync_global_devices("lmsi_jax.lora.export_peft")
  return out_dir


def export(llm: LoraLM, vocab_or_tokenizer_source, out_dir: str, *, merged: bool = True,
           **kw) -> str:
  """HF export: merged weights (`export_hf` of `merge(llm)`) or, with `merged=False`, the
  base model in `out_dir` and the PEFT adapter in `out_dir/adapter`."""
  from lmsi_jax.interop import export_hf  # pylint: disable=g-import-not-at-top
  if merged:
    return export_hf(merge(llm), vocab_or_tokenizer_source, out_dir, **kw)
  base = model_lib.LM(llm.cfg, llm.base_graphdef, llm.frozen, llm.mesh)
  export_hf(base, vocab_or_tokenizer_source, out_dir, **kw)
  return export_peft(llm, os.path.join(out_dir, "adapter"), base_model_name_or_path=out_dir,
                     dtype=kw.get("dtype"))
