"""RunContext: what every stage of one run reads (frozen), built once from the config.

A context holds the config, the workdir, the store, the mesh, the problem, the
tokenizer, the base model, the sampler (`generation.Sampler`, or a test's
`testing.ScriptedSampler`) and the settings objects built from the config.
Stage functions (lmsi_jax/stages.py) take a context and return typed results
(lmsi_jax/results.py); they never assign to it. What changes during a run
makes a new context (`ctx.replace(problem=...)`, `ctx.child(cfg, name)` for a
study's setting), and the one registry that grows (which stage produced which
model and task: `Lineage`) is shared by a context and its children.

What shapes each kind of stage (the store's fingerprint, lmsi_jax/store.py) is
named here, next to the stages' inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from lmsi_jax import distributed
from lmsi_jax import evaluate as eval_lib
from lmsi_jax import fileio
from lmsi_jax import generation
from lmsi_jax import guard as guard_lib
from lmsi_jax import optim
from lmsi_jax import problems
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import seeds
from lmsi_jax import sharding
from lmsi_jax import store as store_lib
from lmsi_jax.data import jsonl
from lmsi_jax.data import tasks

# What shapes each kind of stage (lmsi_jax/store.py: its fingerprint). Groups or dotted
# keys; store.OPERATIONAL keys (logging, checkpoint cadence, mesh, ...) never count.
PROBLEM = ("seed", "model", "task", "synthetic", "data", "guard.probe_n")
SEED_KEYS = ("seed", "task", "synthetic", "data", "formats")
BASE_TRAIN_KEYS = ("seed", "model", "train", "base_train")
BASE_TRAIN_EXCLUDE = tuple(f"train.{k}" for k in (      # base_train.* sets these
    "num_steps", "learning_rate", "warmup_steps", "schedule", "batch_size", "weight_decay",
    "lora"))                                            # stage 0 is always full training
TRAIN_KEYS = ("seed", "model", "train", "rounds.pseudo_weight", "rounds.seed_weight",
              "rounds.previous_weight")
EVAL_KEYS = PROBLEM + ("prompt_format", "eval", "voting.fallback_last_number",
                       "sampling.batch_size")
EVAL_EXCLUDE = ("eval.oracle", "eval.control", "eval.spurious")
SAMPLE_KEYS = PROBLEM + ("prompt_format", "sampling")
VOTE_KEYS = ("task", "formats", "voting", "eval.calibration_bins")
PROBE_KEYS = SAMPLE_KEYS + ("voting",)
SELFGEN_QUESTION_KEYS = PROBLEM + ("prompt_format", "sampling", "voting", "selfgen")
SELFGEN_EXEMPLAR_KEYS = ("seed", "model", "task", "synthetic", "data", "selfgen.exemplars",
                         "selfgen.num_exemplars", "sampling.max_decode_steps",
                         "sampling.batch_size")
ARMS = ("oracle", "control", "spurious")


def ids_hash(questions) -> str:
  return hashlib.sha256("\n".join(str(q["id"]) for q in questions).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Lineage:
  """Which stage produced each model and which stages each registered task reads."""
  made_by: dict = dataclasses.field(default_factory=dict)       # id(lm) -> (lm, stage)
  task_stages: dict = dataclasses.field(default_factory=dict)   # task name -> [stage]


@dataclasses.dataclass(frozen=True)
class RunContext:
  """One run's (or one study setting's) fixed inputs; see the module docstring.

  `view`: the name its config is checked against in a store shared by several
  contexts (w2s, ablation settings); `shared`: path prefixes that resolve under
  another directory (a setting reading another's round 1).
  """
  cfg: object
  workdir: str
  store: store_lib.Store
  mesh: object
  problem: problems.Problem
  vocab: object
  base_lm: object
  sampler: generation.SamplerLike
  sampling: generation.SamplingSettings
  vote_settings: pl.VoteSettings
  guard_settings: guard_lib.GuardSettings
  view: str = ""
  shared: tuple = ()                    # ((prefix parts), root) pairs
  seed_task: object = None              # the labeled seed data's task (stages.seed_data)
  lineage: Lineage = dataclasses.field(default_factory=Lineage)

  # ------------------------------------------------------------- derived contexts
  def replace(self, **changes) -> "RunContext":
    return dataclasses.replace(self, **changes)

  def child(self, cfg, name: str, shared=None) -> "RunContext":
    """A study setting: `cfg`, in DIR/<name>/, checked as view `name`, same model and data."""
    return self.replace(cfg=cfg, workdir=self.path(name), view=name,
                        shared=tuple((shared or {}).items()),
                        sampling=generation.SamplingSettings.from_config(cfg),
                        vote_settings=pl.VoteSettings.from_config(cfg))

  # -------------------------------------------------------------------- paths
  def path(self, *parts: str) -> str:
    for prefix, root in self.shared:
      if parts[:len(prefix)] == prefix:
        return os.path.join(root, *parts)
    return os.path.join(self.workdir, *parts)

  def stage(self, path: str, keys, *, exclude=(), inputs=(), extra=None) -> store_lib.Stage:
    """The store's stage whose main output is `path` (its name: path relative to the run)."""
    return self.store.stage(self.store.name_of(path), self.cfg, keys, exclude=exclude,
                            inputs=inputs, extra=extra, view=self.view)

  def stage_name(self, *parts: str) -> str:
    return self.store.name_of(self.path(*parts))

  # ---------------------------------------------------------------- lineage
  def origin(self, lm) -> str | None:
    """The training stage that produced `lm` (None: the configured base weights)."""
    made = self.lineage.made_by.get(id(lm))
    return made[1] if made is not None and made[0] is lm else None

  def made(self, lm, stage: str) -> None:
    self.lineage.made_by[id(lm)] = (lm, stage)

  def task_stages(self, task) -> list[str]:
    """The stages whose files a registered task or mixture reads."""
    name = getattr(task, "name", task)
    if name in self.lineage.task_stages:
      return self.lineage.task_stages[name]
    return [s for t in getattr(task, "tasks", ()) for s in self.task_stages(t)]

  def exemplar_stage(self) -> str | None:
    """The self-generated exemplars' stage, when prompts and formats use them."""
    return self.stage_name("selfgen", "exemplars.json") if self.cfg.selfgen.exemplars else None

  def register(self, name: str, path: str, records=None, stage: str | None = None):
    """Writes `records` (if given) to `path` and registers it as SeqIO task `name`."""
    if records is not None and distributed.is_main_process():
      jsonl.write_jsonl_atomic(path, records)
    distributed.barrier(f"register {name}")   # every process reads the file process 0 wrote
    producer = stage or self.store.producer(path)
    self.lineage.task_stages[name] = [producer] if producer else []
    return tasks.register_task(name, path, self.vocab)

  def register_mixture(self, name: str, parts):
    self.lineage.task_stages[name] = [s for t, _ in parts for s in self.task_stages(t)]
    return tasks.register_mixture(name, parts)

  # --------------------------------------------------------------- settings
  def prompts(self, questions) -> list[str]:
    return [problems.prompt_for(self.problem, q["question"], self.cfg.prompt_format)
            for q in questions]

  def fit_context(self, problem):
    """Pool/eval questions whose prompt + decode steps exceed the model context: error or skip."""
    return fit_context(self.cfg, problem, self.vocab, self.base_lm)

  def eval_settings(self, temperature: float) -> eval_lib.EvalSettings:
    return eval_lib.EvalSettings.from_config(self.cfg, temperature)

  def train_config(self, base: bool = False):
    return optim.train_config(self.cfg, base)

  def sampler_for(self, lm) -> generation.SamplerLike:
    return self.sampler.for_model(lm)

  def train_done(self, *train_dir: str) -> dict:
    """What the finished training stage in DIR/`train_dir` recorded (wall_s, num_truncated)."""
    return fileio.read_json(self.path(*train_dir, "done.json"))

  # Seeds: named streams of the run's seed (seeds.py), never arithmetic on it.
  def sample_seed(self, r: int) -> int:
    """Round r's pool samples."""
    return seeds.stream(self.cfg.seed, "samples", r)

  def eval_seed(self, index: int) -> int:
    """An evaluation: 0 the base, r round r, 100 the reference arms."""
    return seeds.stream(self.cfg.seed, "eval", index)

  def data_seed(self, r: int) -> int:
    """The batch order of round r's training (0: stage 0)."""
    return seeds.stream(self.cfg.seed, "data", r)


def fit_context(cfg, problem, vocab, lm):
  c = cfg
  return problems.fit_context(
      problem, vocab, c.prompt_format, lm.cfg.max_seq_len,
      {"pool": c.sampling.max_decode_steps, "eval": c.eval.max_decode_steps,
       **({"probe": c.sampling.max_decode_steps} if problem.probe else {})}, c.data.on_error)


def _empty_split(cfg, split: str) -> str:
  """Where a split's questions come from, for the "empty" error."""
  if cfg.task.name == "synthetic":
    return f"config.synthetic.{split}_n" if split == "eval" else "config.synthetic.pool_n"
  d = cfg.data
  name = d.eval_split if split == "eval" else d.pool_split
  limit = f" (config.data.{split}_limit={d[split + '_limit']})" if d[split + "_limit"] else ""
  src = os.path.join(d.dir, f"{name}.jsonl") if d.source == "jsonl" else f"TFDS gsm8k:{name}"
  return f"{src}{limit}"


def _check_not_empty(c, problem) -> None:
  skipped = lambda split: (" (every question was skipped, see above)" if sum(
      (problem.skipped or {}).get(split, {}).values()) else "")
  if not problem.eval:
    raise ValueError(f"the eval set is empty: no questions from {_empty_split(c, 'eval')}"
                     f"{skipped('eval')}; nothing to evaluate")
  needs_pool = c.rounds.num_rounds > 0 or c.mode == "w2s"
  if needs_pool and not problem.pool and not c.selfgen.questions:
    raise ValueError(f"the pool is empty: no questions from {_empty_split(c, 'pool')}"
                     f"{skipped('pool')}; nothing to sample (config.rounds.num_rounds="
                     f"{c.rounds.num_rounds})")


def build_context(cfg, workdir: str, *, restart_from: str = "", store=None, view: str = "",
                  sampler: generation.SamplerLike | None = None) -> RunContext:
  """Opens (or shares) the store, checks `cfg` against it, loads the problem and the model.

  `sampler`: what samples every stage (default: `generation.Sampler` on the base model).
  Config and data errors raise ValueError here, before any work.
  """
  if store is None:     # a fresh run fails here on a changed config: before any work
    store = store_lib.open_store(workdir, cfg, restart_from=restart_from)
  store.check(cfg, view)
  guard_settings = guard_lib.GuardSettings.from_config(cfg.guard)
  problem = problems.hold_out_probe(problems.load_problem(cfg), cfg.guard.probe_n)
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
  from lmsi_jax.loading import build_model  # pylint: disable=g-import-not-at-top
  base_lm, vocab = build_model(cfg, mesh)
  problem = fit_context(cfg, problem, vocab, base_lm)
  _check_not_empty(cfg, problem)
  sampler = (sampler.for_model(base_lm) if sampler is not None
             else generation.Sampler(base_lm, vocab, mesh))
  fileio.makedirs(workdir)
  return RunContext(cfg=cfg, workdir=workdir, store=store, mesh=mesh, problem=problem,
                    vocab=vocab, base_lm=base_lm, sampler=sampler,
                    sampling=generation.SamplingSettings.from_config(cfg),
                    vote_settings=pl.VoteSettings.from_config(cfg),
                    guard_settings=guard_settings, view=view)
