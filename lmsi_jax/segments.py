"""Attention over KV segments: a shared prefix, a question's own tokens, a row's own tokens.

LMSI samples m paths for each of N questions that all start with the same
few-shot block. `segment_layers` runs the model's blocks on new tokens whose
attention reads several separately stored KV segments (the prefix's KV once
for every row, a question's KV once for its m rows, each row's own KV) plus
the new tokens themselves. The segments' scores are concatenated along the
key axis and normalised by one softmax, so the result is the attention over
the concatenated keys (the same math as one cache holding the whole row),
with each segment stored once.

The layers run as one scan over their stacked parameters and stacked KV
([L, ...] arrays); a decode step runs the same body per layer over slices
made once per chunk (`segment_layers(split=...)`). A `Segment` is one layer's (k, v, valid, pos): k/v [Bk,S,KV,D] with Bk = 1 (shared by
every row) or B; `valid` [B or 1, T or 1, S] says which keys each query may
see; `pos` [B or 1, S] are the keys' positions (for sliding-window layers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmsi_jax import model as model_lib

NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class Segment:
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  pos: jax.Array


def _block_query(q):
  """q [B,1,KV,G,D] -> block-diagonal [B, KV*D, KV*G]: the shared keys [S, KV*D] (a free
  reshape of the cache) times it are exactly the per-head scores of every row, as one GEMM
  with no transpose of the cache."""
  b, _, kvh, g, d = q.shape
  eye = jnp.eye(kvh, dtype=q.dtype)
  return jnp.einsum("bkgd,kl->bldkg", q[:, 0], eye).reshape(b, kvh * d, kvh * g)


# One decode step (T = 1) contracts shared keys with the block-diagonal query (one GEMM). A
# row's own keys [B,S,KV,D] are read by head size: below 64 as a batched GEMM with the same
# query over a free reshape ([B,S,KV*D]); from 64 up as a broadcast multiply and a reduction
# over D, which XLA:CPU fuses into one pass over the cache. Each is the faster one for its
# side: at head dim 16 (the demo's model, 1,024 rows) the multiply-reduce made sampling
# 3.7-4.4x slower; at head dim 64 (SmolLM2, 32 rows, 256 own tokens) the batched GEMM is
# 1.1-1.3x slower per step (BENCHMARKS.md, "Demo sampling").
_REDUCE_MIN_HEAD_DIM = 64


def _scores(q, k, qb):
  """q [B,T,KV,G,D], k [Bk,S,KV,D] -> [B,T,KV,G,S] f32 (Bk = 1 is shared by every row)."""
  shared = k.shape[0] == 1 and q.shape[0] != 1
  f32 = jnp.float32
  if qb is not None and not shared and k.shape[-1] >= _REDUCE_MIN_HEAD_DIM:
    s = jnp.sum(k[:, :, :, None, :].astype(f32) * q[:, 0][:, None].astype(f32), -1)  # [B,S,KV,G]
    return jnp.moveaxis(s, 1, -1)[:, None]
  if qb is not None:                                           # one decode step
    b, _, kvh, g, _ = q.shape
    kf = k.reshape(k.shape[0], k.shape[1], -1)                 # [Bk,S,KV*D]
    s = (jnp.einsum("sc,bcj->bsj", kf[0], qb, preferred_element_type=f32) if shared else
         jnp.einsum("bsc,bcj->bsj", kf, qb, preferred_element_type=f32))
    return jnp.swapaxes(s, 1, 2).reshape(b, 1, kvh, g, -1)
  if shared:
    return jnp.einsum("btkgd,skd->btkgs", q, k[0], preferred_element_type=f32)
  return jnp.einsum("btkgd,bskd->btkgs", q, k, preferred_element_type=f32)


def _weighted(p, v):
  """p [B,T,KV,G,S], v [Bk,S,KV,D] -> [B,T,KV,G,D] f32."""
  b, t, kvh, g, _ = p.shape
  shared = v.shape[0] == 1 and b != 1
  f32 = jnp.float32
  if t == 1 and not shared and v.shape[-1] >= _REDUCE_MIN_HEAD_DIM:
    pt = jnp.moveaxis(p[:, 0], -1, 1).astype(f32)              # [B,S,KV,G]
    return jnp.sum(pt[..., None] * v[:, :, :, None, :].astype(f32), axis=1)[:, None]
  if t == 1:                                                   # one decode step: _block_query
    pf = jnp.swapaxes(p.reshape(b, kvh * g, -1), 1, 2)         # [B,S,KV*G]
    vf = v.reshape(v.shape[0], v.shape[1], -1)                 # [Bk,S,KV*D]
    o = (jnp.einsum("bsj,sc->bjc", pf, vf[0], preferred_element_type=f32) if shared else
         jnp.einsum("bsj,bsc->bjc", pf, vf, preferred_element_type=f32))
    o = o.reshape(b, kvh, g, kvh, -1) * jnp.eye(kvh, dtype=o.dtype)[None, :, None, :, None]
    return o.sum(3)[:, None]
  if shared:
    return jnp.einsum("btkgs,skd->btkgd", p, v[0], preferred_element_type=f32)
  return jnp.einsum("btkgs,bskd->btkgd", p, v, preferred_element_type=f32)


def attend(attn: model_lib.Attention, q, qpos, segments: list[Segment], local):
  """Softmax attention of q [B,T,H,D] (positions qpos [B,T]) over the concatenated segments.
  `local`: a sliding-window layer (a Python bool, or a traced bool in the scan over layers)."""
  cfg = attn.cfg
  dt = model_lib.DTYPES[cfg.dtype]
  b, t, h, hd = q.shape
  kvh = segments[0].k.shape[2]
  q = q.reshape(b, t, kvh, h // kvh, hd) * attn.scale()
  cap = cfg.attn_logit_softcap
  qb = _block_query(q) if t == 1 else None
  parts = []
  for seg in segments:
    s = _scores(q, seg.k.astype(dt), qb)
    if cap:
      s = cap * jnp.tanh(s / cap)
    valid = seg.valid
    if cfg.sliding_window and local is not False:
      near = (qpos[:, :, None] - seg.pos[:, None, :]) < cfg.sliding_window
      valid = valid & (near if local is True else near | ~local)
    parts.append(jnp.where(valid[:, :, None, None, :], s, NEG))
  probs = jax.nn.softmax(jnp.concatenate(parts, -1), axis=-1).astype(dt)
  out, start = 0.0, 0
  for seg, s in zip(segments, parts):
    n = s.shape[-1]
    out = out + _weighted(probs[..., start:start + n], seg.v.astype(dt))
    start += n
  return attn.output(out.astype(dt).reshape(b, t, h, hd))


def segment_layers(model: model_lib.Llama, tokens, positions, stored, layer_segments, self_valid,
                   split=None):
  """Runs every block on `tokens` [B,T] at `positions` [B,T]: one scan over the stacked layers.

  `stored`: a pytree whose leaves have a leading layer axis (the layers' stored KV), or
  None; layer_segments(slice of `stored`) -> that layer's stored segments. The new tokens'
  own keys are appended as a last segment with `self_valid` [B or 1, T, T].
  `split` (decoding): `model.split_scan_xs(fixed)`, the parameters and the loop-invariant
  stored KV `fixed` (a tuple) already sliced per layer; the same scan body then runs per layer
  on them, `stored` is then a list of L per-layer tuples, and each layer's stored tuple is its
  slice of `fixed` followed by its entry of `stored`.
  Returns (final-norm hidden [B,T,hidden], the new tokens' {"k","v"}: [L,B,T,KV,D], or with
  `split` a list of L [B,T,KV,D] dicts).
  """
  def layer(block, x, stored_i, local):
    q, k, v = block.attn.project(block.attn_norm(x), positions, local)
    segs = list(layer_segments(stored_i)) + [Segment(k, v, self_valid, positions)]
    h = attend(block.attn, q, positions, segs, local)
    if block.post_norms:
      h = block.attn_post_norm(h)
    x = x + h
    m = block.mlp(block.mlp_norm(x))
    return x + (block.mlp_post_norm(m) if block.post_norms else m), {"k": k, "v": v}

  body, x = model.scan_body(layer), model.embed_tokens(tokens)
  if split is None:
    x, new_kv = jax.lax.scan(body, x, model.scan_xs(stored))
  else:
    new_kv = []
    for (params, flag, fixed), stored_i in zip(split, stored):
      x, y = body(x, (params, flag, tuple(fixed) + tuple(stored_i)))
      new_kv.append(y)
  return model.final_norm(x), new_kv
