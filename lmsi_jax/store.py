"""The run store: whether a stage is done, what produced it, how long it took.

One `Store` per run directory (the `--workdir`), shared by every stage of
every runner (rounds, arms, studies, teacher/student). It keeps:

  DIR/stages.json   the ledger, one entry per stage in the order stages first started:
                    status ("started" | "done"), the config values that shaped the stage
                    (`config`), its inputs' fingerprints (`inputs`), its own fingerprint,
                    the files it owns (`paths`), its outputs' line counts and sha256
                    (`outputs`), its wall time (`wall_s`, the one timing ledger)
  DIR/config.json   the full config of the latest run that passed the checks below
  DIR/.lock         an fcntl lock held by the running process (the file holds its pid)

A stage (`store.stage(name, cfg, keys, inputs=...)`) declares which config groups
and keys shape it and which stages it reads from. Its fingerprint is a hash
of those config values and of its inputs' fingerprints. Then:

  - done, same fingerprint: reused, after its outputs are checked against the
    recorded line counts and sha256 (a mismatch is one line naming the file);
  - started (a killed run): resumed (sampling per shard, training from its
    checkpoint) if its fingerprint matches;
  - recorded with another fingerprint: a `StoreError` at once, naming the stage
    and the changed keys (old -> new). `Store.check(cfg)` does this for every
    recorded stage when a run opens the store, so a changed config fails
    before any work. `restart_from(stage)` (the CLI's `--restart_from=STAGE`)
    removes that stage, the stages recorded after it, and their files.

Done-markers are written last (the ledger entry turns "done" after the outputs
exist) and atomically (fileio.write_json_atomic). Multi-host: process 0 reads
the ledger and decides; the other processes agree (`distributed.agreed`), so a
skip decision can never differ between hosts; only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from typing import Any

from lmsi_jax import distributed
from lmsi_jax import fileio

LEDGER, CONFIG, LOCK = "stages.json", "config.json", ".lock"
# Where a run executes, not what it computes: never part of a fingerprint. (The mesh
# may change the last bits of a reduction; a preempted job may resume on another slice.)
OPERATIONAL = ("mode", "mesh", "distributed", "logging", "train.log_every", "train.checkpoint_every",
               "train.max_to_keep", "base_train.checkpoint_every")
_RESTART_HINT = "rerun with --restart_from={} to start it and the stages after it over"


class StoreError(ValueError):
  """A one-line refusal: changed config, changed or missing outputs, a held lock."""


# ------------------------------------------------------------------- config values
def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _under(key: str, group: str) -> bool:
  return key == group or key.startswith(group + ".")


def config_values(cfg, keys: Sequence[str], exclude: Sequence[str] = ()) -> dict[str, Any]:
  """The JSON values of `cfg`'s leaves under `keys` (groups or dotted keys), minus
  `exclude` and OPERATIONAL."""
  flat = _flatten(json.loads(cfg.to_json()))
  drop = tuple(exclude) + OPERATIONAL
  return {k: v for k, v in sorted(flat.items())
          if any(_under(k, g) for g in keys) and not any(_under(k, e) for e in drop)}


def fingerprint(values: dict, inputs: dict) -> str:
  blob = json.dumps({"config": values, "inputs": inputs}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _changes(old: dict, new: dict) -> str:
  short = lambda v: json.dumps(v) if len(json.dumps(v)) <= 40 else json.dumps(v)[:37] + "..."
  diff = [f"{k} {short(old[k]) if k in old else '(absent)'} -> "
          f"{short(new[k]) if k in new else '(absent)'}"
          for k in sorted(set(old) | set(new)) if old.get(k, object()) != new.get(k, object())]
  return ", ".join(diff)


def file_record(path: str) -> dict:
  """Line count and sha256 of a file (what a done stage promises about its output)."""
  data = fileio.read_bytes(path)
  return {"lines": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


# -------------------------------------------------------------------------- lock
_LOCKS: dict[str, Any] = {}     # this process's held locks (re-entrant within a process)


def lock(root: str) -> None:
  """Locks `root` for this process (fcntl); a second process fails at once naming the holder.

  Local paths only: gs:// has no advisory locks, so two runs on one bucket
  path are not prevented (run them from one launcher).
  """
  if fileio.is_remote(root) or not distributed.is_main_process():
    return       # other processes of a multi-process run share process 0's lock
  import fcntl  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(root), LOCK)
  if path in _LOCKS:
    return
  fileio.makedirs(root)
  f = open(path, "a+")          # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "?"
    f.close()
    raise StoreError(f"{root} is in use by another run (pid {holder} holds {path}); wait for "
                     "it or use another --workdir") from None
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()}\n")
  f.flush()
  _LOCKS[path] = f               # held until this process exits


# ------------------------------------------------------------------------- store
_STORES: dict[str, Store] = {}


def open_store(root: str, cfg=None, *, restart_from: str = "") -> Store:
  """The (per process, per directory) store of a run; locks it, applies `restart_from`,
  checks every recorded stage against `cfg`, then records `cfg` as DIR/config.json."""
  key = root if fileio.is_remote(root) else os.path.abspath(root)
  s = _STORES.get(key)
  if s is None:
    s = _STORES[key] = Store(root)
  if restart_from:
    s.restart_from(restart_from)
  if cfg is not None:
    s.check(cfg)
    s.write_config(cfg)
  return s


class Store:
  """See the module docstring. Build it with `open_store` (one per directory)."""

  def __init__(self, root: str):
    self.root = root
    fileio.makedirs(root)
    lock(root)
    self._ledger = self._read()

  # ----------------------------------------------------------------- ledger I/O
  def path(self, *parts: str) -> str:
    return fileio.join(self.root, *parts)

  def _read(self) -> dict:
    p = self.path(LEDGER)
    return fileio.read_json(p)["stages"] if fileio.exists(p) else {}

  def _write(self) -> None:
    if distributed.is_main_process():     # not key-sorted: the stages stay in their run order
      fileio.write_text_atomic(self.path(LEDGER), json.dumps({"stages": self._ledger}, indent=1))

  def _refresh(self) -> None:
    if not distributed.is_main_process():   # process 0 writes; the others read after agreeing
      self._ledger = self._read()

  def entries(self) -> dict[str, dict]:
    return dict(self._ledger)

  def write_config(self, cfg) -> None:
    distributed.write_json(self.path(CONFIG), json.loads(cfg.to_json()))

  def name_of(self, path: str) -> str:
    """A stage name from its main path: relative to the root, without an extension."""
    rel = os.path.relpath(path, self.root) if not fileio.is_remote(path) else (
        path[len(self.root.rstrip("/")) + 1:])
    return os.path.splitext(rel)[0]

  def producer(self, path: str) -> str | None:
    """The stage that owns `path` (one of its outputs or paths), if any."""
    rel = os.path.relpath(path, self.root)
    for name, e in self._ledger.items():
      if rel in e.get("outputs", {}) or any(rel == p or rel.startswith(p + os.sep)
                                             for p in e.get("paths", ())):
        return name
    return None

  # ------------------------------------------------------------------- checking
  def check(self, cfg, view: str = "") -> None:
    """Fails (one line) on the first recorded stage of `view` whose config values differ
    from `cfg`'s: called when a run opens the store, before any work."""
    for name, e in self._ledger.items():
      if e.get("view", "") != view or "spec" not in e:
        continue
      sp = e["spec"]
      now = {**config_values(cfg, sp["keys"], sp["exclude"]), **sp.get("extra", {})}
      if now != e["config"]:
        raise StoreError(f"stage {name} in {self.root} was made with another config: "
                         f"{_changes(e['config'], now)}; {_RESTART_HINT.format(name)}")

  def verify(self, name: str) -> None:
    """Each recorded output of a done stage still has its line count and sha256."""
    for rel, want in self._ledger[name].get("outputs", {}).items():
      p = self.path(rel)
      if not fileio.exists(p):
        raise StoreError(f"{p} is missing, but stage {name} recorded it as its output; "
                         f"restore it or {_RESTART_HINT.format(name)}")
      have = file_record(p)
      if have != want:
        raise StoreError(f"{p} has {have['lines']} lines (sha256 {have['sha256'][:12]}) but "
                         f"stage {name} recorded {want['lines']} (sha256 {want['sha256'][:12]}):"
                         f" it changed after it was written; restore it or "
                         f"{_RESTART_HINT.format(name)}")

  def stage(self, name: str, cfg, keys: Sequence[str], *, exclude: Sequence[str] = (),
            inputs: Iterable[str | None] = (), extra: dict | None = None,
            view: str = "") -> Stage:
    """The stage `name`: done (verified, reusable) or to run. Raises StoreError on a
    fingerprint mismatch. `extra`: values other than config keys that shape it."""
    values = {**config_values(cfg, keys, exclude), **(extra or {})}
    ins = {i: self.fingerprint_of(i) for i in dict.fromkeys(x for x in inputs if x)}
    fp = fingerprint(values, ins)
    code, err = 0, ""
    if distributed.is_main_process():
      e = self._ledger.get(name)
      try:
        if e is not None and e["fingerprint"] != fp:
          if e["config"] != values:
            raise StoreError(f"stage {name} in {self.root} was made with another config: "
                             f"{_changes(e['config'], values)}; {_RESTART_HINT.format(name)}")
          raise StoreError(f"stage {name} in {self.root} was made from other inputs: "
                           f"{_changes(e['inputs'], ins)}; {_RESTART_HINT.format(name)}")
        if e is not None and e["status"] == "done":
          self.verify(name)
          code = 1
      except StoreError as ex:
        code, err = 2, str(ex)
    code = distributed.agreed(code)
    if code == 2:
      raise StoreError(err or f"stage {name}: process 0 refused to reuse it (see its log)")
    self._refresh()
    return Stage(self, name, values, ins, fp, done=code == 1, view=view,
                 spec={"keys": list(keys), "exclude": list(exclude), "extra": extra or {}})

  def fingerprint_of(self, name: str) -> str | None:
    """A recorded stage's fingerprint; None for one that never ran through the store (a
    notebook driving stages by hand)."""
    e = self._ledger.get(name)
    return None if e is None else e["fingerprint"]

  # ------------------------------------------------------------------- writing
  def _begin(self, st: Stage, paths: Sequence[str]) -> None:
    old = self._ledger.get(st.name)
    self._ledger[st.name] = {
        "status": "started", "fingerprint": st.fingerprint, "config": st.values,
        "inputs": st.inputs, "spec": st.spec, "view": st.view,
        "paths": sorted(set((old or {}).get("paths", [])) | {self._rel(p) for p in paths}),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    self._write()

  def _finish(self, st: Stage, outputs: Sequence[str], wall_s: float, info: dict) -> None:
    e = self._ledger[st.name]
    if distributed.is_main_process():
      e["outputs"] = {self._rel(p): file_record(p) for p in outputs}
    e.update(status="done", wall_s=wall_s, **info)
    self._write()               # the done-marker: last, atomic
    distributed.barrier(f"stage {st.name} done")

  def _rel(self, p: str) -> str:
    return os.path.relpath(p, self.root) if not fileio.is_remote(p) else (
        p[len(self.root.rstrip("/")) + 1:])

  # ------------------------------------------------------------------- timing
  def wall_s(self, names: Iterable[str] | None = None) -> float:
    """Recorded wall time of the done stages among `names` (default: all of them)."""
    names = self._ledger if names is None else names
    return float(sum(self._ledger[n].get("wall_s", 0.0) for n in names
                     if n in self._ledger and self._ledger[n]["status"] == "done"))

  # ------------------------------------------------------------------ restart
  def restart_from(self, name: str) -> list[str]:
    """Removes stage `name`, every stage recorded after it, and their files."""
    names = list(self._ledger)
    if name not in self._ledger:
      raise StoreError(f"--restart_from={name}: no such stage in {self.path(LEDGER)} "
                       f"(recorded: {', '.join(names) or 'none'})")
    gone = names[names.index(name):]
    if distributed.is_main_process():
      for n in gone:
        for rel in list(self._ledger[n].get("paths", [])) + list(self._ledger[n].get("outputs", {})):
          p = self.path(rel)
          if fileio.is_remote(p):
            import tensorflow as tf  # pylint: disable=g-import-not-at-top
            if tf.io.gfile.exists(p):
              (tf.io.gfile.rmtree if tf.io.gfile.isdir(p) else tf.io.gfile.remove)(p)
          elif os.path.isdir(p):
            shutil.rmtree(p)
          elif os.path.exists(p):
            os.remove(p)
    for n in gone:
      del self._ledger[n]
    self._write()
    distributed.barrier(f"restart from {name}")
    logging.warning("restart: removed stage(s) %s and their files", ", ".join(gone))
    return gone


@dataclasses.dataclass
class Stage:
  """One stage's handle: `done` (reuse its outputs) or `begin()` ... `finish(outputs)`."""
  store: Store
  name: str
  values: dict
  inputs: dict
  fingerprint: str
  done: bool
  view: str = ""
  spec: dict = dataclasses.field(default_factory=dict)
  t0: float = 0.0

  def begin(self, *paths: str) -> Stage:
    """Records the stage as started (with its fingerprint) and the files it owns."""
    self.t0 = time.time()
    if distributed.is_main_process():
      self.store._begin(self, paths)  # pylint: disable=protected-access
    else:
      self.store._ledger[self.name] = {"status": "started", "fingerprint": self.fingerprint}  # pylint: disable=protected-access
    return self

  def elapsed(self) -> float:
    return time.time() - self.t0

  def finish(self, *outputs: str, wall_s: float | None = None, **info) -> float:
    """Records the outputs' line counts and sha256, then marks the stage done. Returns
    the stage's wall time (also recorded in the ledger)."""
    wall_s = self.elapsed() if wall_s is None else wall_s
    logging.info("stage %-24s done in %7.1f s", self.name, wall_s)
    self.store._finish(self, outputs, wall_s, info)  # pylint: disable=protected-access
    self.done = True
    return wall_s
