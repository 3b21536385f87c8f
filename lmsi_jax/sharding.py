"""Device mesh and the one logical-axis rules table.

Every parameter and activation is annotated with *logical* axis names
(`embed`, `mlp`, `heads`, ...). `RULES` maps them to the mesh axes
(`data`, `fsdp`, `model`). The mesh shape comes from config; `-1` infers
one dimension from the device count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH = ("data", "fsdp")

# Logical axis -> mesh axis (or axes, or None = replicated). One-to-one per key.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("cache_length", None),
    ("layers", None),           # the stacked layers' leading axis (scanned, never sharded)
)
_RULES = dict(RULES)


def infer_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one `-1` entry; raises a one-line ValueError if it cannot fit."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={shape}: use positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape={shape} does not fit {num_devices} devices "
                       f"({num_devices} is not divisible by {known})")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices but "
                     f"{num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over (data, fsdp, model) with Auto axis types (GSPMD propagation)."""
  devices = list(jax.devices()) if devices is None else list(devices)
  shape = infer_mesh_shape(shape, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """Maps logical names to a PartitionSpec.

  With `shape` and `mesh`, a dimension that does not divide evenly by its
  mesh axes is replicated instead (logged once), e.g. SmolLM2's 3 KV heads
  on a model axis of 2.
  """
  out, used = [], set()
  for i, name in enumerate(logical):
    axes = _RULES.get(name) if name is not None else None
    if axes is not None:
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
      axes_t = tuple(a for a in axes_t if a not in used)
      if mesh is not None:
        axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1)
      if shape is not None and mesh is not None and axes_t:
        size = math.prod(mesh.shape[a] for a in axes_t)
        if shape[i] % size:
          _warn_once(name, shape[i], axes_t, size)
          axes_t = ()
      used.update(axes_t)
      axes = None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t)
    out.append(axes)
  return P(*out)


_WARNED: set[tuple] = set()


def _warn_once(name, dim, axes, size):
  key = (name, dim, axes)
  if key not in _WARNED:
    _WARNED.add(key)
    logging.warning("Replicating logical axis %r (size %d): not divisible by mesh axes %s (size %d).",
                    name, dim, axes, size)


def named_sharding(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int] | None = None):
  return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for an (abstract) nnx.State / pytree of nnx.Variables.

  Each Variable's `out_sharding` metadata (logical names) is mapped through
  RULES; leaves without metadata are replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding")
      val = x.get_value()
      shape = getattr(val, "shape", ())
      sh = (named_sharding(mesh, names, shape) if names else NamedSharding(mesh, P()))
      return x.replace(sh)
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim over data*fsdp, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """Global batch sizes must be a multiple of this."""
  return math.prod(mesh.shape[a] for a in BATCH)


def constrain(x, mesh: Mesh, logical: Sequence[str | None]):
  """with_sharding_constraint by logical names (inside jit)."""
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical, x.shape))
