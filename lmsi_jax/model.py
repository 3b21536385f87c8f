"""Decoder-only Llama-family transformer in Flax NNX.

Covers Llama 2/3.x, SmolLM2, Mistral-style, Qwen2 (q/k/v bias), Qwen3 and
Gemma 3 text with ONE forward pass: token embedding (tied or untied),
RMSNorm, RoPE, grouped-query attention, gated MLP, final norm, LM head.
Family differences are small named options of `ModelConfig` (all off by
default, which is the Llama path): `qk_norm` (per-head RMSNorm of q and k,
Qwen3/Gemma 3), `norm_offset` (RMSNorm scales by offset + w: Gemma's 1 + w),
`post_norms` (norms after attention and MLP too, Gemma 2/3), `mlp_activation`
("silu" SwiGLU | "gelu_tanh" GeGLU), `embed_scale` (embeddings times
sqrt(hidden)), `query_pre_attn_scalar`, `attn_logit_softcap` /
`final_logit_softcap`, `rope_type` ("default" | "llama3" | "linear", with its
factors), and `layer_types` + `sliding_window` + `rope_local_theta`
(interleaved sliding-window and global layers, each kind with its own RoPE
base). The layers' parameters are stored stacked (`layers` is one Block
whose parameters have a leading layer axis, logical name "layers", mapped to
no mesh axis) and run by ONE layer body (`scan_body`): a `jax.lax.scan` over
the stacked parameters in training, prefill and `__call__`; the sampler's
decode loop applies the same body per layer to parameters sliced once per
sampling call (`split_scan_xs`, `engine.split_layers`: inside a loop of steps XLA:CPU would copy each
layer's slice every step). A prefill's KV cache is stacked too, [L, ...], read per
layer and written once after the layers; the decode loop keeps per-layer caches. A layer's kind (sliding or global) is a
scanned bool when the layers are mixed, a Python bool otherwise. A sliding layer masks
keys whose slot is `sliding_window` or more before the query's slot (slots
and positions differ by a constant per row, also with left padding).
The options and presets live in `model_config.py`, RoPE in `rope.py` (both re-exported
here). Every parameter carries logical axis names;
`sharding.RULES` maps them to the mesh. Parameters are created already
sharded (`init_sharded`: jit of the constructor with out_shardings).

Call signature (one for training, prefill and decode):
  logits, cache = model(tokens[B,T], positions[B,T], mask[B,T,S], cache, cache_index)
`mask[b, t, s]` says whether query t may attend to key slot s. Without a
cache S == T; with a cache S is the cache length and the new keys/values are
written at `cache_index`. Training may pass `remat=` ("full" | "dots", see
REMAT_POLICIES): the same scan body under `jax.checkpoint` with that policy;
sampling never does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from lmsi_jax import sharding
from lmsi_jax.model_config import (ACTIVATIONS, DTYPES, LAYER_TYPES, PRESETS,  # noqa: F401
                                   INITS, ROPE_TYPES, ModelConfig, preset)
from lmsi_jax.rope import base_frequencies, rope, rope_frequencies  # noqa: F401

# Per-block rematerialisation (MaxText's `remat_policy`): what the backward pass keeps of
# each block's forward. "none": everything (fastest, most memory); "full": only the block
# input, the block is recomputed; "dots": the weight matmuls' outputs (no batch dims), so
# the [T,T] attention scores and elementwise ops are recomputed.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


_init = nnx.initializers.normal(0.02)


def _param(rngs: nnx.Rngs, shape, names, dtype, init=_init) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def _kernel(cfg: ModelConfig, rngs: nnx.Rngs, shape, names, fan_in: int,
            residual: bool = False) -> nnx.Param:
  """A projection's weights, drawn as `cfg.init` says (ModelConfig.init)."""
  if cfg.init == "normal":
    init = _init
  else:
    std = fan_in ** -0.5 / ((2 * cfg.num_layers) ** 0.5 if residual else 1.0)
    init = nnx.initializers.normal(std)
  return _param(rngs, shape, names, DTYPES[cfg.param_dtype], init)


class RMSNorm(nnx.Module):
  """RMSNorm; with `offset` the scale is (offset + w), w initialised to 0 (Gemma)."""

  def __init__(self, dim: int, eps: float, dtype, *, rngs: nnx.Rngs, offset: float = 0.0):
    del rngs
    self.eps = eps
    self.offset = offset
    init = jnp.zeros if offset else jnp.ones
    self.scale = nnx.Param(init((dim,), dtype), out_sharding=("norm",))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.offset:
      scale = self.offset + scale
    return (y * scale).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.q_proj = _kernel(cfg, rngs, (d, h, hd), ("embed", "heads", "head_dim"), d)
    self.k_proj = _kernel(cfg, rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), d)
    self.v_proj = _kernel(cfg, rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), d)
    self.o_proj = _kernel(cfg, rngs, (h, hd, d), ("heads", "head_dim", "embed"), h * hd,
                          residual=True)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pd, zeros)
      self.k_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, zeros)
      self.v_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, zeros)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.norm_eps, pd, rngs=rngs, offset=cfg.norm_offset)
      self.k_norm = RMSNorm(hd, cfg.norm_eps, pd, rngs=rngs, offset=cfg.norm_offset)

  def project(self, x, positions, local=False):
    """q [B,T,H,D] (RoPE'd, not yet scaled), k and v [B,T,KV,D] of the inputs `x`."""
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    freq = _select(local, rope_frequencies(cfg, True), rope_frequencies(cfg, False), cfg.head_dim,
                   cfg.rope_theta)
    return rope(q, positions, cfg.rope_theta, freq), rope(k, positions, cfg.rope_theta, freq), v

  def scale(self) -> float:
    cfg = self.cfg
    return cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else cfg.head_dim ** -0.5

  def output(self, out):
    """[B,T,H,D] attention output -> [B,T,hidden] (o_proj)."""
    return jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(DTYPES[self.cfg.dtype]))

  def __call__(self, x, positions, mask, cache, cache_index, local=False):
    """(output, {"k","v"} of the new tokens or None). `cache`: this layer's old {"k","v"}
    [B,S,KV,D] or None (the caller writes the new keys/values at `cache_index`). `local`:
    this layer is a sliding-window layer (a Python bool, or a traced bool in the scan)."""
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    q, k, v = self.project(x, positions, local)
    if cfg.sliding_window and local is not False:
      t_, s_ = q.shape[1], mask.shape[-1]
      near = ((cache_index + jnp.arange(t_))[:, None] - jnp.arange(s_)[None, :]) < cfg.sliding_window
      if local is not True:
        near = near | ~local
      mask = mask & near[None]
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, hd) * self.scale()
    cap = cfg.attn_logit_softcap or None
    if cache is not None and t == 1:                                    # one decode step
      out = _decode_attention(q[:, 0], k[:, 0].astype(dt), v[:, 0].astype(dt), cache["k"].astype(dt),
                              cache["v"].astype(dt), mask[:, 0], cache_index, cap).reshape(b, t, h, hd)
    new_kv = None if cache is None else {"k": k, "v": v}
    if cache is not None and t > 1:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
    if cache is None or t > 1:
      # KV heads repeated to the query heads: plain 4-D einsums run ~2x faster on
      # XLA:CPU (forward + backward) than the grouped 5-D form, for the same math.
      g = h // kvh
      k, v = jnp.repeat(k.astype(dt), g, axis=2), jnp.repeat(v.astype(dt), g, axis=2)
      scores = jnp.einsum("bthd,bshd->bhts", q.reshape(b, t, h, hd), k).astype(jnp.float32)
      if cap:
        scores = cap * jnp.tanh(scores / cap)
      scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt)
      out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return self.output(out), new_kv


def _select(local, a, b, d: int, theta: float):
  """RoPE inverse frequencies for a layer: `a` (local) or `b` (global); None = the default
  RoPE computed in `rope` (the unchanged Llama path). `local` may be traced (scan)."""
  if local is True or local is False:
    return a if local else b
  if a is None and b is None:
    return None
  base = base_frequencies(theta, d)
  return jnp.where(local, base if a is None else a, base if b is None else b)


def _decode_attention(q, k_new, v_new, k_cache, v_cache, mask, index, softcap=None):
  """Single-query attention; same result as writing (k_new, v_new) at `index` and attending.

  q [B,KV,G,D], k_new/v_new [B,KV,D], caches [B,S,KV,D] (before the update), mask [B,S].
  Reads the *old* cache so the in-place cache update does not feed the
  attention: XLA would otherwise copy or transpose the whole cache per layer
  and step (more traffic than the attention). Each row's cache is one
  [S, KV*D] matrix (a free reshape) multiplied by a block-diagonal query
  [KV*D, KV*G]; zero blocks make it exactly the per-head scores, at KV x the
  (tiny) FLOPs. Slot `index` takes the new key/value.
  """
  b, s, kvh, hd = k_cache.shape
  g = q.shape[2]
  dt = q.dtype
  eye = jnp.eye(kvh, dtype=dt)
  qb = (jnp.swapaxes(q, 2, 3)[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(b, kvh * hd, kvh * g)
  scores = jnp.einsum("bsc,bcj->bsj", k_cache.reshape(b, s, kvh * hd), qb,
                      preferred_element_type=jnp.float32)                     # [B,S,(KV,G)]
  new = jnp.sum(q * k_new[:, :, None, :], -1, dtype=jnp.float32).reshape(b, 1, kvh * g)
  if softcap:
    scores, new = softcap * jnp.tanh(scores / softcap), softcap * jnp.tanh(new / softcap)
  here = (jnp.arange(s) == index)[None, :, None]
  scores = jnp.where(here, new, scores)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=1)
  p_new = jnp.sum(jnp.where(here, probs, 0.0), 1).reshape(b, kvh, g, 1)
  p_old = jnp.where(here, 0.0, probs).astype(dt)
  out = jnp.einsum("bsj,bsc->bjc", p_old, v_cache.reshape(b, s, kvh * hd))   # [B,(KV,G),(KV,D)]
  out = (out.reshape(b, kvh, g, kvh, hd) * eye[None, :, None, :, None]).sum(3)
  return (out + p_new * v_new[:, :, None, :]).astype(dt)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.dtype = DTYPES[cfg.dtype]
    self.act = cfg.mlp_activation
    self.gate_proj = _kernel(cfg, rngs, (d, f), ("embed", "mlp"), d)
    self.up_proj = _kernel(cfg, rngs, (d, f), ("embed", "mlp"), d)
    self.down_proj = _kernel(cfg, rngs, (f, d), ("mlp", "embed"), f, residual=True)

  def __call__(self, x):
    dt = self.dtype
    g = x @ self.gate_proj[...].astype(dt)
    u = x @ self.up_proj[...].astype(dt)
    return (ACTIVATIONS[self.act](g) * u) @ self.down_proj[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.norm_eps, pd, rngs=rngs,
                             offset=cfg.norm_offset)
    self.post_norms = cfg.post_norms
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.post_norms:
      self.attn_post_norm = norm()
      self.mlp_post_norm = norm()

  def __call__(self, x, positions, mask, cache, cache_index, local=False):
    h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, local)
    if self.post_norms:
      h = self.attn_post_norm(h)
    x = x + h
    if self.post_norms:
      return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x))), cache
    return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
  """The decoder. `layers` is ONE Block whose parameters are stacked on a leading layer axis
  (logical name "layers"); `cache` is {"k","v"}: [L,B,S,KV,D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
    self.layers = stack_blocks([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, pd, rngs=rngs, offset=cfg.norm_offset)
    if not cfg.tie_embeddings:
      self.lm_head = _kernel(cfg, rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                             cfg.hidden_size)

  def __call__(self, tokens, positions, mask, cache=None, cache_index=0, remat="none"):
    x, new_cache = self.hidden(tokens, positions, mask, cache, cache_index, remat)
    return self.logits(x), new_cache

  def hidden(self, tokens, positions, mask, cache=None, cache_index=0, remat="none"):
    """Final-norm hidden states [B,T,D] and the cache: `__call__` without the LM head."""
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    if remat != "none" and cache is not None:
      raise ValueError("remat is for training (no KV cache)")
    body = self.scan_body(lambda block, x, c, local: block(x, positions, mask, c, cache_index,
                                                           local))
    if remat != "none":
      # Rematerialised: each layer is recomputed inside the backward loop, where no
      # scheduler can hoist it back next to the forward pass.
      body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    x, new_kv = jax.lax.scan(body, self.embed_tokens(tokens), self.scan_xs(cache))
    if cache is None:
      return self.final_norm(x), None
    return self.final_norm(x), {n: jax.lax.dynamic_update_slice_in_dim(
        cache[n], new_kv[n].astype(cache[n].dtype), cache_index, axis=2) for n in ("k", "v")}

  def scan_xs(self, per_layer=None):
    """What the scan over layers reads per layer: (parameters, kind flag, `per_layer`: a
    pytree with a leading layer axis, e.g. the KV cache, or None)."""
    kinds = [self.cfg.is_local(i) for i in range(self.cfg.num_layers)]
    flags = jnp.asarray(kinds) if len(set(kinds)) > 1 else None
    return nnx.state(self.layers, nnx.Param), flags, per_layer

  def split_scan_xs(self, per_layer=None) -> list:
    """`scan_xs(per_layer)` sliced per layer: L trees, each what one step of the scan reads.
    Decoding slices once per sampling call (engine.split_layers), outside its loop over steps, and applies `scan_body`
    per layer (segments.segment_layers(split=...)): inside a loop, XLA:CPU copies a scanned
    layer's slice of every stacked weight on every step instead of reading it in place (decode
    was 1.4x slower for it, BENCHMARKS.md). MaxText likewise decodes with scan_layers=False."""
    xs = self.scan_xs(per_layer)
    return [jax.tree.map(lambda a, i=i: a[i], xs) for i in range(self.cfg.num_layers)]

  def scan_body(self, fn):
    """The scan body over `scan_xs`: fn(block, x, per_layer slice, local) -> (x, y). Mixed
    sliding/global layers get their kind as a scanned bool, uniform ones a Python bool.
    State other than parameters (LoRA dropout's RNG) is shared by every layer."""
    graphdef, _, rest = nnx.split(self.layers, nnx.Param, ...)
    uniform = self.cfg.is_local(0)

    def body(x, xs):
      params, flag, per_layer = xs
      params = nnx.spmd.remove_axis(jax.tree.map(lambda v: v, params), 0,   # fresh Variables
                                    {nnx.PARTITION_NAME: "layers"})
      block = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))   # fresh Variables
      return fn(block, x, per_layer, uniform if flag is None else flag)
    return body

  def embed_tokens(self, tokens):
    """[B,T] ids -> [B,T,hidden] inputs of the first block (compute dtype)."""
    x = jnp.take(self.embed[...], tokens, axis=0)
    if self.cfg.embed_scale:      # as transformers: sqrt(hidden) rounded to the weight dtype
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), jnp.float32).astype(x.dtype)
    return x.astype(DTYPES[self.cfg.dtype])

  def logits(self, x):
    """LM head: [B,T,D] hidden states -> [B,T,V] f32 logits."""
    dt = DTYPES[self.cfg.dtype]
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
    if self.cfg.final_logit_softcap:
      cap = self.cfg.final_logit_softcap
      logits = cap * jnp.tanh(logits / cap)
    return logits

  def init_cache(self, batch: int, length: int, dtype=None) -> dict[str, jax.Array]:
    cfg = self.cfg
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_LOGICAL = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block holding the blocks' parameters stacked on a new leading axis ("layers").
  Built from per-layer Blocks so that a model's initial weights do not depend on the
  layout (the same random draws, in the same order, as one Block per layer)."""
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
  return nnx.merge(graphdef, nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: "layers"}))


def causal_mask(length: int, valid=None):
  """[B or 1, T, T] causal mask; `valid[B,T]` masks padded key positions."""
  m = jnp.tril(jnp.ones((length, length), bool))[None]
  return m if valid is None else m & valid[:, None, :].astype(bool)


def segment_mask(segment_ids):
  """Causal attention within packed segments (segment id > 0)."""
  seg = segment_ids
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  return same & causal_mask(seg.shape[1])


def abstract_model(cfg: ModelConfig, mesh: Mesh):
  """(graphdef, abstract state with NamedShardings, shardings) without allocating."""
  with nnx.use_eager_sharding(False):
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.state_shardings(abs_state, mesh)
  abs_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  return graphdef, abs_state, shardings


@functools.lru_cache(maxsize=32)
def _init_fn(cfg: ModelConfig, mesh: Mesh):
  _, _, shardings = abstract_model(cfg, mesh)

  def make(key):
    with nnx.use_eager_sharding(False):
      return nnx.split(Llama(cfg, rngs=nnx.Rngs(params=key)))[1]

  return jax.jit(make, out_shardings=shardings)


def init_sharded(cfg: ModelConfig, mesh: Mesh, seed: int = 0):
  """Creates the parameters directly on their shards. Returns (graphdef, state)."""
  graphdef = abstract_model(cfg, mesh)[0]
  return graphdef, _init_fn(cfg, mesh)(jax.random.key(seed))


def forward(graphdef, state, tokens, positions, mask, cache=None, cache_index=0, remat="none"):
  """Pure functional forward: merge (graphdef, state) and call."""
  return nnx.merge(graphdef, state)(tokens, positions, mask, cache, cache_index, remat)


@dataclasses.dataclass
class LM:
  """A model ready to run: config, NNX graphdef, sharded state and its mesh."""
  cfg: ModelConfig
  graphdef: Any
  state: Any
  mesh: Mesh

  @classmethod
  def init(cls, cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> "LM":
    graphdef, state = init_sharded(cfg, mesh, seed)
    return cls(cfg, graphdef, state, mesh)

  def __call__(self, tokens, positions, mask, cache=None, cache_index=0):
    with jax.set_mesh(self.mesh):
      return forward(self.graphdef, self.state, tokens, positions, mask, cache, cache_index)
