"""The self-improvement pipeline: base → rounds (sample, vote, label, train, eval) → arms.

Everything a stage produces lands atomically under the workdir:

  DIR/data/seed.jsonl                   labeled seed data in the configured formats
  DIR/base/train/                       stage 0 checkpoints (when base_train.enabled)
  DIR/base/eval.json                    base model: greedy / SC accuracy, calibration
  DIR/round_<r>/samples/shard_*.jsonl   m sampled paths per pool question
  DIR/round_<r>/votes.jsonl             per question: voted answer, share, diagnostics
  DIR/round_<r>/pseudo_labels.jsonl     kept paths × formats: the round's SeqIO task
  DIR/round_<r>/vote_summary.json       pool precision / shares / calibration
  DIR/round_<r>/train/                  Orbax checkpoints + TensorBoard events
  DIR/round_<r>/eval.json               the round's model, evaluated
  DIR/selfgen/exemplars.json            self-generated few-shot exemplars (selfgen.exemplars)
  DIR/round_<r>/selfgen/                self-generated questions (selfgen.questions)
  DIR/{base,round_<r>}/probe.json       collapse guard: label-free probe signals (guard.probe_n)
  DIR/{oracle,control,spurious}/...     reference arms with the identical recipe
  DIR/report.json, report.md, *.png     see lmsi_jax/report.py

Re-running the same command skips finished stages and resumes the
interrupted one (sampling per shard, training from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lmsi_jax import distributed
from lmsi_jax import early_stop as early_stop_lib
from lmsi_jax import evaluate as eval_lib
from lmsi_jax import fileio
from lmsi_jax import guard as guard_lib
from lmsi_jax import lora as lora_lib
from lmsi_jax import optim
from lmsi_jax import problems
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import report as report_lib
from lmsi_jax import seeds
from lmsi_jax import selfgen
from lmsi_jax import sharding
from lmsi_jax import store as store_lib
from lmsi_jax import train as train_lib
from lmsi_jax import wandb_logger
from lmsi_jax.data import features
from lmsi_jax.data import jsonl
from lmsi_jax.data import tasks
from lmsi_jax.models_io import build_model


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


def _ids_hash(questions) -> str:
  return hashlib.sha256("\n".join(str(q["id"]) for q in questions).encode()).hexdigest()[:16]


def _empty_split(cfg, split: str) -> str:
  """Where a split's questions come from, for the "empty" error."""
  if cfg.task.name == "synthetic":
    return f"config.synthetic.{split}_n" if split == "eval" else "config.synthetic.pool_n"
  d = cfg.data
  name = d.eval_split if split == "eval" else d.pool_split
  limit = f" (config.data.{split}_limit={d[split + '_limit']})" if d[split + "_limit"] else ""
  src = os.path.join(d.dir, f"{name}.jsonl") if d.source == "jsonl" else f"TFDS gsm8k:{name}"
  return f"{src}{limit}"


@dataclasses.dataclass
class Pipeline:
  """State shared by the stages of one run (a notebook can drive it stage by stage).

  `restart_from`: a stage name (see DIR/stages.json) to start over with the stages after
  it, as main.py's --restart_from. `store`/`view`: a runner driving several pipelines
  (w2s) shares one store; `view` names the config they were checked against.
  """
  cfg: object
  workdir: str
  restart_from: str = ""
  store: store_lib.Store | None = None
  view: str = ""

  def __post_init__(self):
    cfg = self.cfg
    if self.store is None:     # a fresh run fails here on a changed config: before any work
      self.store = store_lib.open_store(self.workdir, cfg, restart_from=self.restart_from)
    self.store.check(cfg, self.view)
    self.guard_settings = guard_lib.GuardSettings.from_config(cfg.guard)
    self.problem = problems.hold_out_probe(problems.load_problem(cfg), cfg.guard.probe_n)
    self.mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    self.base_lm, self.vocab = build_model(cfg, self.mesh)
    self.problem = self.fit_context(self.problem)
    self._check_not_empty()
    self.vote_settings = pl.VoteSettings(
        cfg.task.answer_type, cfg.task.cue, cfg.task.stop, cfg.voting.min_vote_share,
        cfg.voting.max_paths, cfg.voting.dedup, cfg.voting.weighted,
        cfg.voting.fallback_last_number, cfg.task.extractor)
    self.seed_task = None
    self.round_records: dict[int, int] = {}     # round -> pseudo-label records (run_lmsi)
    self._made_by: dict[int, tuple[object, str]] = {}   # id(lm) -> (lm, training stage)
    self._task_stages: dict[str, list[str]] = {}         # task/mixture -> stages it reads
    fileio.makedirs(self.workdir)

  def _check_not_empty(self):
    c = self.cfg
    skipped = lambda split: (" (every question was skipped, see above)" if sum(
        (self.problem.skipped or {}).get(split, {}).values()) else "")
    if not self.problem.eval:
      why = skipped("eval")
      raise ValueError(f"the eval set is empty: no questions from {_empty_split(c, 'eval')}"
                       f"{why}; nothing to evaluate")
    needs_pool = c.rounds.num_rounds > 0 or c.mode == "w2s"
    if needs_pool and not self.problem.pool and not c.selfgen.questions:
      why = skipped("pool")
      raise ValueError(f"the pool is empty: no questions from {_empty_split(c, 'pool')}{why}; "
                       "nothing to sample (config.rounds.num_rounds="
                       f"{c.rounds.num_rounds})")

  # ------------------------------------------------------------------ helpers
  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def stage(self, path: str, keys, *, exclude=(), inputs=(), extra=None) -> store_lib.Stage:
    """The store's stage whose main output is `path` (its name: path relative to the run)."""
    return self.store.stage(self.store.name_of(path), self.cfg, keys, exclude=exclude,
                            inputs=inputs, extra=extra, view=self.view)

  def origin(self, lm) -> str | None:
    """The training stage that produced `lm` (None: the configured base weights)."""
    made = self._made_by.get(id(lm))
    return made[1] if made is not None and made[0] is lm else None

  def task_stages(self, task) -> list[str]:
    """The stages whose files a registered task or mixture reads."""
    name = getattr(task, "name", task)
    if name in self._task_stages:
      return self._task_stages[name]
    return [s for t in getattr(task, "tasks", ()) for s in self.task_stages(t)]

  def exemplar_stage(self) -> str | None:
    """The self-generated exemplars' stage, when prompts and formats use them."""
    return (self.store.name_of(self.path("selfgen", "exemplars.json"))
            if self.cfg.selfgen.exemplars else None)

  def prompts(self, questions) -> list[str]:
    return [problems.prompt_for(self.problem, q["question"], self.cfg.prompt_format)
            for q in questions]

  def fit_context(self, problem):
    """Pool/eval questions whose prompt + decode steps exceed the model context: error or skip."""
    c = self.cfg
    return problems.fit_context(
        problem, self.vocab, c.prompt_format, self.base_lm.cfg.max_seq_len,
        {"pool": c.sampling.max_decode_steps, "eval": c.eval.max_decode_steps,
         **({"probe": c.sampling.max_decode_steps} if problem.probe else {})}, c.data.on_error)

  def eval_settings(self, temperature: float) -> eval_lib.EvalSettings:
    e, t = self.cfg.eval, self.cfg.task
    return eval_lib.EvalSettings(
        self.cfg.prompt_format, e.num_samples, temperature, e.top_k, e.top_p,
        e.max_decode_steps, e.calibration_bins, self.cfg.sampling.batch_size, t.answer_type,
        t.cue, t.stop, self.cfg.voting.fallback_last_number, t.extractor)

  def train_config(self, base: bool = False) -> train_lib.TrainConfig:
    return optim.train_config(self.cfg, base)

  def register(self, name: str, path: str, records=None, stage: str | None = None):
    if records is not None and distributed.is_main_process():
      jsonl.write_jsonl_atomic(path, records)
    distributed.barrier(f"register {name}")   # every process reads the file process 0 wrote
    producer = stage or self.store.producer(path)
    self._task_stages[name] = [producer] if producer else []
    return tasks.register_task(name, path, self.vocab)

  def _labels_stage(self, path: str, make_records, task_name: str, extra=None):
    """A stage writing gold-labelled records (seed data, oracle labels) and its task."""
    st = self.stage(path, SEED_KEYS, inputs=[self.exemplar_stage()], extra=extra)
    recs = None
    if not st.done:
      st.begin(path)
      recs = make_records()
    task = self.register(task_name, path, recs, stage=st.name)
    if not st.done:
      st.finish(path)
    return task

  # ------------------------------------------------------------------- stages
  def seed_data(self):
    """Registers the labeled seed data (if the task has any) as a SeqIO task."""
    if not self.problem.seed:
      return None
    path = self.path("data", "seed.jsonl")
    st = self.stage(path, SEED_KEYS)      # the seed data keeps the task's own exemplars
    recs = None
    if not st.done:
      st.begin(path)
      recs = pl.gold_records(self.problem.seed, exemplars=self.problem.exemplars,
                             formats=self.cfg.formats, round_index=0)
    self.seed_task = self.register(tasks.seed_task_name(self.problem.name), path, recs,
                                   stage=st.name)
    if not st.done:
      st.finish(path)
    return self.seed_task

  def train(self, lm, mixture, out_dir: str, *, base: bool = False, data_seed: int = 0,
            loss_fn=None, extra_keys: tuple[str, ...] = ()):
    tcfg = self.train_config(base)
    lcfg = lora_lib.LoraConfig() if base else lora_lib.LoraConfig.from_config(self.cfg.train.lora)
    keys, exclude = ((BASE_TRAIN_KEYS, BASE_TRAIN_EXCLUDE) if base
                     else (TRAIN_KEYS + tuple(extra_keys), () if lcfg.enabled else ("train.lora",)))
    st = self.stage(out_dir, keys, exclude=exclude,
                    inputs=[self.origin(lm), *self.task_stages(mixture)],
                    extra={"data_seed": data_seed})
    if not st.done:
      st.begin(out_dir)
    batches = features.GlobalBatches(
        mixture, tcfg.seq_len, tcfg.batch_size, seed=data_seed,
        num_shards=self.cfg.train.data_shards, process_index=jax.process_index(),
        process_count=jax.process_count(), num_batches=tcfg.num_steps)
    if lcfg.enabled:    # only the adapters are trained (and donated); sample with them merged
      lm = lora_lib.apply(lm, lcfg, self.cfg.seed)
    else:     # train() donates its input state; the base model is reused by later stages.
      lm = dataclasses.replace(lm, state=jax.tree.map(lambda x: x.copy(), lm.state))
    lm = train_lib.train(lm, batches, tcfg, out_dir, config_json=self.cfg.to_json(),
                         desc=os.path.relpath(out_dir, self.workdir), loss_fn=loss_fn)
    if lcfg.enabled:
      lm = lora_lib.merge(lm)
    cut = batches.truncated
    if jax.process_count() > 1:
      cut = int(np.sum(multihost_utils.process_allgather(np.array([cut]))))
    if cut:
      logging.warning("%s: %d training example(s) were longer than train.seq_len=%d and lost "
                      "their end (the answer) to truncation; raise train.seq_len",
                      os.path.relpath(out_dir, self.workdir), cut, tcfg.seq_len)
    if not st.done:
      done = os.path.join(out_dir, "done.json")
      wall_s = st.elapsed()
      distributed.write_json(done, {"wall_s": wall_s, "num_steps": tcfg.num_steps,
                                    "num_truncated": cut})
      st.finish(done, wall_s=wall_s)
    self._made_by[id(lm)] = (lm, st.name)
    return lm

  def train_done(self, *train_dir: str) -> dict:
    """What the finished training stage in DIR/`train_dir` recorded (wall_s, num_truncated)."""
    return fileio.read_json(self.path(*train_dir, "done.json"))

  def _eval_stage(self, lm, out_path: str, temperature: float, seed_offset: int):
    rel = os.path.relpath(out_path, self.workdir)
    base = rel == os.path.join("base", "eval.json")
    exclude = EVAL_EXCLUDE + (("eval.temperature",) if base else ("eval.base_temperature",))
    keys = EVAL_KEYS
    if os.path.dirname(rel) in ARMS:     # an arm trains as many rounds as the kept LMSI model
      keys += ("rounds.num_rounds", "rounds.early_stop_patience", "guard")
    return self.stage(out_path, keys, exclude=exclude,
                      inputs=[self.origin(lm), self.exemplar_stage()],
                      extra={"temperature": temperature, "seed_offset": seed_offset})

  def evaluate(self, lm, out_path: str, temperature: float, seed_offset: int) -> dict:
    st = self._eval_stage(lm, out_path, temperature, seed_offset)
    if st.done:
      return fileio.read_json(out_path)
    st.begin(out_path)
    qs = self.problem.eval
    s = self.eval_settings(temperature)
    name = os.path.basename(os.path.dirname(out_path))
    with tqdm(total=len(qs) * (1 + s.num_samples), desc=f"eval {name}",
              disable=not distributed.is_main_process(), mininterval=2) as bar:
      res = eval_lib.evaluate(lm, self.vocab, qs, self.prompts(qs), s,
                              seed=self.cfg.seed * 7919 + seed_offset, progress=bar.update)
    res["wall_s"] = st.elapsed()
    distributed.write_json(out_path, res)
    st.finish(out_path, wall_s=res["wall_s"])
    return res

  def sample(self, lm, questions, out_dir: str, seed: int, progress=None) -> list[dict]:
    """`config.sampling.num_samples` paths per question, sharded and resumable under out_dir."""
    s = self.cfg.sampling
    return pl.sample_pool(
        lm, self.vocab, questions, self.prompts(questions), out_dir,
        num_samples=s.num_samples, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        max_decode_steps=s.max_decode_steps, stop=self.cfg.task.stop, seed=seed,
        batch_size=s.batch_size, questions_per_shard=s.questions_per_shard, progress=progress)

  def sample_and_vote(self, lm, r: int, source_step: int, questions=None) -> dict:
    """Stages sample → vote → pseudo-labels for round r (default questions: the pool)."""
    rdir = self.path(f"round_{r}")
    c, qs = self.cfg, self.problem.pool if questions is None else questions
    gen = self.store.name_of(os.path.join(rdir, "selfgen")) if c.selfgen.questions else None
    samples_dir, seed = self.path(f"round_{r}", "samples"), c.seed * 1009 + r
    sst = self.stage(samples_dir, SAMPLE_KEYS,
                     inputs=[self.origin(lm), self.exemplar_stage(), gen],
                     extra={"sample_seed": seed, "questions": _ids_hash(qs)})
    if not sst.done:
      sst.begin(samples_dir)
    vst = None
    if sst.done:
      vst = self._vote_stage(rdir, sst, r, source_step)
      if vst.done:
        return fileio.read_json(os.path.join(rdir, "vote_summary.json"))
    s = c.sampling
    with tqdm(total=len(qs) * s.num_samples, desc=f"sample round {r}",
              disable=not distributed.is_main_process() or sst.done, mininterval=2) as bar:
      samples = self.sample(lm, qs, samples_dir, seed, progress=bar.update)
    if not sst.done:
      shards = [os.path.join(samples_dir, f) for f in fileio.listdir(samples_dir)
                if f.startswith("shard_")] if distributed.is_main_process() else []
      sst.finish(*shards)
      vst = self._vote_stage(rdir, sst, r, source_step)
    vst.begin(*(os.path.join(rdir, n) for n in ("votes.jsonl", "pseudo_labels.jsonl",
                                               "vote_summary.json")))
    labels, votes = pl.vote_pool(samples, qs, self.vote_settings, exemplars=self.problem.exemplars,
                                 formats=c.formats, round_index=r, source_step=source_step)
    if not labels:
      logging.warning("round %d: voting kept no path (no parseable answer in any sample); "
                      "the round trains on the rest of its mixture", r)
    outs = [os.path.join(rdir, n) for n in ("votes.jsonl", "pseudo_labels.jsonl",
                                           "vote_summary.json")]
    if distributed.is_main_process():
      jsonl.write_jsonl_atomic(outs[0], votes)
      jsonl.write_jsonl_atomic(outs[1], labels)
    summary = pl.summarize_votes(votes, c.eval.calibration_bins)
    summary.update(num_records=len(labels), sample_wall_s=self.store.wall_s([sst.name]),
                   vote_wall_s=vst.elapsed())
    distributed.write_json(outs[2], summary)
    vst.finish(*outs, wall_s=summary["vote_wall_s"])
    return summary

  def _vote_stage(self, rdir: str, sst, r: int, source_step: int) -> store_lib.Stage:
    return self.stage(os.path.join(rdir, "vote"), VOTE_KEYS,
                      inputs=[sst.name, self.exemplar_stage()],
                      extra={"round": r, "source_step": source_step})

  def probe(self, lm, r: int, previous: dict | None) -> dict:
    """Collapse-guard signals of `lm` (round r; 0 = stage 0) on the held-out unlabeled probe."""
    rdir = self.path(f"round_{r}" if r else "base")
    out_path, samples_dir = os.path.join(rdir, "probe.json"), os.path.join(rdir, "probe_samples")
    seed = seeds.stream(self.cfg.seed, "probe", r)
    prev_stage = self.store.name_of(self.path(f"round_{r - 1}" if r > 1 else "base",
                                              "probe.json")) if r else None
    st = self.stage(out_path, PROBE_KEYS, inputs=[self.origin(lm), self.exemplar_stage(),
                                                 prev_stage],
                    extra={"sample_seed": seed, "questions": _ids_hash(self.problem.probe)})
    if st.done:
      return fileio.read_json(out_path)
    st.begin(samples_dir, out_path)
    qs = self.problem.probe
    with tqdm(total=len(qs) * self.cfg.sampling.num_samples, desc=f"probe {r}",
              disable=not distributed.is_main_process(), mininterval=2) as bar:
      samples = self.sample(lm, qs, samples_dir, seed, progress=bar.update)
    voted = [pl.vote_record(rec, self.vote_settings) for rec in samples]
    sig = guard_lib.probe_signals([a for *_, a in voted], [t for t, *_ in voted],
                                  previous and previous["majorities"])
    sig["wall_s"] = st.elapsed()
    distributed.write_json(out_path, sig)
    st.finish(out_path, wall_s=sig["wall_s"])
    return sig

  def mixture(self, arm: str, r: int, round_tasks: list) -> object:
    """Round r's training mixture: latest labels, earlier rounds, seed data."""
    rc = self.cfg.rounds
    parts = []
    if round_tasks and rc.pseudo_weight > 0:
      parts.append((round_tasks[-1], rc.pseudo_weight))
    if len(round_tasks) > 1 and rc.previous_weight > 0:
      parts += [(t, rc.previous_weight / (len(round_tasks) - 1)) for t in round_tasks[:-1]]
    if self.seed_task is not None and (rc.seed_weight > 0 or not parts):
      parts.append((self.seed_task, rc.seed_weight or 1.0))
    if not parts:
      raise ValueError(f"round {r} ({arm}): nothing to train on: no pseudo-labels (no sample "
                       "reached an answer; see round_*/vote_summary.json) and no seed data, or "
                       "rounds.pseudo_weight and rounds.seed_weight are both 0")
    name = f"lmsi_{self.problem.name}_{arm}_round_{r}_mix"
    self._task_stages[name] = [s for t, _ in parts for s in self.task_stages(t)]
    return tasks.register_mixture(name, parts)

  def recorded_wall_s(self) -> float:
    """Sum of every finished stage's recorded wall time (the store's ledger; survives resumes)."""
    return self.store.wall_s()

  # --------------------------------------------------------------------- runs
  def run_lmsi(self, base_lm, base_steps: int, base_greedy_acc: float) -> list[dict]:
    """The rounds; `self.early_stop` then holds report.json's "early_stop" entry."""
    rounds, current, step = [], base_lm, base_steps
    round_tasks = []
    stop = early_stop_lib.EarlyStop(self.cfg.rounds.early_stop_patience, base_greedy_acc)
    guard = guard_lib.CollapseGuard(self.guard_settings) if self.guard_settings.enabled else None
    previous_lm, signals = base_lm, None
    if guard:
      signals = self.probe(base_lm, 0, None)
      guard.update(signals)
    for r in range(1, self.cfg.rounds.num_rounds + 1):
      pool, gen = self.problem.pool, {}
      if self.cfg.selfgen.questions:      # LMSI §3.3: new questions join this round's pool
        extra, gen = selfgen.generate_questions(self, current, r)
        pool = pool + extra
      summary = self.sample_and_vote(current, r, step, pool)
      self.round_records[r] = summary["num_records"]
      if summary["num_records"]:
        round_tasks.append(self.register(tasks.round_task_name(self.problem.name, r),
                                         self.path(f"round_{r}", "pseudo_labels.jsonl")))
      cont = self.cfg.rounds.init == "continue"
      init = current if cont else base_lm
      step = (step if cont else base_steps) + self.cfg.train.num_steps
      current = self.train(init, self.mixture("lmsi", r, round_tasks),
                           self.path(f"round_{r}", "train"), data_seed=self.cfg.seed + 1000 * r,
                           extra_keys=("rounds.init",) if r > 1 else ())
      ev = self.evaluate(current, self.path(f"round_{r}", "eval.json"), self.cfg.eval.temperature, r)
      done = self.train_done(f"round_{r}", "train")
      rounds.append({"round": r, "greedy_acc": ev["greedy_acc"], "sc_acc": ev["sc_acc"],
                     "num_questions": summary["num_questions"],
                     "num_pseudo_labels": summary["num_pseudo_labels"],
                     "num_records": summary["num_records"],
                     "pseudo_label_precision": summary["pseudo_label_precision"],
                     "mean_vote_share": summary["mean_vote_share"],
                     "pass_at_k": summary["pass_at_k"], "maj_at_k": summary["maj_at_k"],
                     "mean_distinct_answers": summary["mean_distinct_answers"],
                     "mean_distinct_paths": summary["mean_distinct_paths"],
                     "pool_calibration": summary["pool_calibration"],
                     "calibration": ev["calibration"],
                     "extraction": ev.get("extraction"),
                     "train_truncated": done.get("num_truncated", 0),
                     **({"selfgen": gen} if gen else {}),
                     "wall_s": summary["sample_wall_s"] + summary["vote_wall_s"] + done["wall_s"]
                               + ev["wall_s"] + gen.get("wall_s", 0.0)})
      stopping = stop.update(r, ev["greedy_acc"])
      if guard:
        signals = self.probe(current, r, signals)
        stopping |= guard.update(signals)
        rounds[-1]["guard"] = guard.history[-1]
        if guard.stopped_after == r:     # keep the last unflagged model
          current = previous_lm
      wandb_logger.log_round(self.cfg, self.path(f"round_{r}"), rounds[-1])  # no-op without W&B
      if stopping:
        break
      previous_lm = current
    self.early_stop = stop.report()
    self.collapse_guard = guard.report() if guard else None
    self.final_round = guard.kept_round if guard else len(rounds)
    self.final_lm = current
    return rounds

  def run_arm(self, arm: str, base_lm, num_rounds: int) -> dict | None:
    """Same recipe, as many rounds as the kept LMSI model, from the base model.

    oracle: gold CoT for the same pool; control: the seed data only; spurious: LMSI's own
    samples of each round, but the paths of a random non-majority answer (as many as LMSI
    kept; `pseudo_labels.spurious_pool`): if it gains as much as LMSI, the gain is format
    learning, not self-improvement.
    """
    if arm == "control" and self.seed_task is None:
      logging.warning("control arm skipped: the task has no labeled seed data")
      return None
    current, round_tasks = base_lm, []
    for r in range(1, num_rounds + 1):
      if arm == "oracle":
        round_tasks.append(self._labels_stage(
            self.path("oracle", f"round_{r}", "labels.jsonl"),
            lambda r=r: pl.gold_records(
                problems.with_gold_cot(self.problem, self.problem.pool, seed=self.cfg.seed + r),
                exemplars=self.problem.exemplars, formats=self.cfg.formats, round_index=r),
            f"lmsi_{self.problem.name}_oracle_round_{r}",
            extra={"round": r, "questions": _ids_hash(self.problem.pool)}))
      elif arm == "spurious" and self.round_records[r]:   # as many records as LMSI's round r
        round_tasks.append(self._spurious_labels(r))
      init = current if self.cfg.rounds.init == "continue" else base_lm
      current = self.train(init, self.mixture(arm, r, round_tasks),
                           self.path(arm, f"round_{r}", "train"), data_seed=self.cfg.seed + 1000 * r,
                           extra_keys=("rounds.init",) if r > 1 else ())
    res = self.evaluate(current, self.path(arm, "eval.json"), self.cfg.eval.temperature, 100)
    train_s = sum(self.train_done(arm, f"round_{r}", "train")["wall_s"]
                  for r in range(1, num_rounds + 1))
    return {**res, "wall_s": res["wall_s"] + train_s}   # the arm's fine-tunes and its eval

  def _spurious_labels(self, r: int):
    """The spurious arm's round-r labels (a SeqIO task) from LMSI's round-r samples."""
    path = self.path("spurious", f"round_{r}", "labels.jsonl")
    samples = self.store.name_of(self.path(f"round_{r}", "samples"))
    st = self.stage(path, VOTE_KEYS, inputs=[samples], extra={"round": r})
    recs = None
    if not st.done:
      st.begin(path)
      recs = pl.spurious_pool(pl.read_samples(self.path(f"round_{r}", "samples")),
                              self.vote_settings, seed=seeds.stream(self.cfg.seed, "spurious"),
                              exemplars=self.problem.exemplars, formats=self.cfg.formats,
                              round_index=r, source_step=0)
    task = self.register(f"lmsi_{self.problem.name}_spurious_round_{r}", path, recs,
                         stage=st.name)
    if not st.done:
      st.finish(path)
    return task

  def run(self) -> dict:
    t0 = time.time()
    base_lm, base_steps, base = self.run_base()
    rounds = self.run_lmsi(base_lm, base_steps, base["greedy_acc"])
    arms = {arm: self.run_arm(arm, base_lm, self.final_round) for arm in ARMS
            if self.cfg.eval[arm] and self.final_round}
    report = report_lib.build_report(self.cfg, base, rounds, arms.get("oracle"),
                                     arms.get("control"), spurious=arms.get("spurious"),
                                     final_round=self.final_round, wall_s=self.recorded_wall_s(),
                                     wall_s_this_invocation=time.time() - t0)
    report["early_stop"] = self.early_stop
    report["collapse_guard"] = self.collapse_guard
    report["skipped"] = self.problem.skipped     # records dropped under data.on_error="skip"
    if distributed.is_main_process():
      report_lib.write_report(report, self.workdir)
    return report

  def run_base(self):
    """Seed data, stage 0, self-generated exemplars, base eval: (base_lm, base_steps, eval)."""
    self.seed_data()
    base_lm, base_steps = self.base_lm, 0
    if self.cfg.base_train.enabled:
      if self.seed_task is None:
        raise ValueError("config.base_train.enabled=True needs a task with labeled seed data")
      base_lm = self.train(base_lm, self.seed_task, self.path("base", "train"), base=True,
                           data_seed=self.cfg.seed)
      base_steps = self.cfg.base_train.num_steps
    if self.cfg.selfgen.exemplars:        # LMSI §3.3: the base model writes the exemplars
      self.problem = self.fit_context(dataclasses.replace(
          self.problem, exemplars=selfgen.generate_exemplars(self, base_lm)))
    base = self.evaluate(base_lm, self.path("base", "eval.json"), self.cfg.eval.base_temperature, 0)
    if self.cfg.base_train.enabled:    # the base's wall_s, like a round's, covers its training
      base = {**base, "wall_s": base["wall_s"] + self.train_done("base", "train")["wall_s"]}
    return base_lm, base_steps, base


def run(cfg, workdir: str) -> dict:
  """Runs (or resumes) the whole pipeline; returns the report dict."""
  return Pipeline(cfg, workdir).run()

