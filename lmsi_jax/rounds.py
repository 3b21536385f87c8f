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
import logging
import time
from collections.abc import Callable

from lmsi_jax import distributed
from lmsi_jax import early_stop as early_stop_lib
from lmsi_jax import guard as guard_lib
from lmsi_jax import report as report_lib
from lmsi_jax import results
from lmsi_jax import selfgen
from lmsi_jax import stages as stages_lib
from lmsi_jax import wandb_logger
from lmsi_jax.learners import vote_dpo
from lmsi_jax.learners import vote_rl
from lmsi_jax.context import (ARMS, BASE_TRAIN_EXCLUDE, BASE_TRAIN_KEYS, EVAL_EXCLUDE,  # noqa: F401
                              EVAL_KEYS, PROBE_KEYS, SAMPLE_KEYS, SEED_KEYS,
                              SELFGEN_EXEMPLAR_KEYS, SELFGEN_QUESTION_KEYS, TRAIN_KEYS, VOTE_KEYS,
                              RunContext, build_context)
from lmsi_jax.data import tasks


@dataclasses.dataclass(frozen=True)
class Stages:
  """The stage functions a runner calls (a test injects stand-ins with `dataclasses.replace`)."""
  train: Callable = stages_lib.train
  evaluate: Callable = stages_lib.evaluate
  sample_and_vote: Callable = stages_lib.sample_and_vote
  probe: Callable = stages_lib.probe
  generate_questions: Callable = selfgen.generate_questions
  generate_exemplars: Callable = selfgen.generate_exemplars
  vote_rl: Callable = vote_rl.train_round          # rounds.learner="vote_rl"
  vote_dpo: Callable = vote_dpo.train_round        # rounds.learner="vote_dpo"


STAGES = Stages()


def run_base(ctx: RunContext, st: Stages = STAGES) -> results.BaseResult:
  """Seed data, stage 0, self-generated exemplars, base eval."""
  ctx = ctx.replace(seed_task=stages_lib.seed_data(ctx))
  lm, steps = ctx.base_lm, 0
  c = ctx.cfg
  if c.base_train.enabled:
    if ctx.seed_task is None:
      raise ValueError("config.base_train.enabled=True needs a task with labeled seed data")
    lm = st.train(ctx, lm, ctx.seed_task, ctx.path("base", "train"), base=True,
                  data_seed=ctx.data_seed(0))
    steps = c.base_train.num_steps
  if c.selfgen.exemplars:        # LMSI §3.3: the base model writes the exemplars
    ctx = ctx.replace(problem=ctx.fit_context(dataclasses.replace(
        ctx.problem, exemplars=st.generate_exemplars(ctx, lm))))
  ev = st.evaluate(ctx, lm, ctx.path("base", "eval.json"), c.eval.base_temperature, 0)
  if c.base_train.enabled:    # the base's wall_s, like a round's, covers its training
    ev = ev.with_wall_s(ev.wall_s + ctx.train_done("base", "train")["wall_s"])
  return results.BaseResult(ctx, lm, steps, ev)


def run_lmsi(ctx: RunContext, base: results.BaseResult, st: Stages = STAGES
             ) -> results.LmsiResult:
  """The rounds from `base` (its lm, steps and greedy accuracy), in `ctx`'s directory."""
  c = ctx.cfg
  rows, current, step = [], base.lm, base.steps
  round_tasks, round_records = [], {}
  stop = early_stop_lib.EarlyStop(c.rounds.early_stop_patience, base.eval.greedy_acc)
  guard = guard_lib.CollapseGuard(ctx.guard_settings) if ctx.guard_settings.enabled else None
  previous_lm, signals = base.lm, None
  if guard:
    signals = st.probe(ctx, base.lm, 0, None)
    guard.update(signals)
  for r in range(1, c.rounds.num_rounds + 1):
    pool, gen = ctx.problem.pool, {}
    if c.selfgen.questions:      # LMSI §3.3: new questions join this round's pool
      extra, gen = st.generate_questions(ctx, current, r)
      pool = pool + extra
    cont = c.rounds.init == "continue"
    init = current if cont else base.lm
    out_dir, learner = ctx.path(f"round_{r}", "train"), c.rounds.learner
    if learner == "vote_rl":     # on-policy: its own samples and votes, every batch
      current, summary = st.vote_rl(ctx, init, base.lm, r, pool, out_dir)
      round_records[r] = 0
      step = (step if cont else base.steps) + (c.vote_rl.steps_per_round
                                               * c.vote_rl.updates_per_batch)
    else:
      summary = st.sample_and_vote(ctx, current, r, step, pool)
      round_records[r] = summary.num_records
      step = (step if cont else base.steps) + c.train.num_steps
    if learner == "vote_dpo":    # pairs from the round's vote store
      current = st.vote_dpo(ctx, init, r, out_dir)
    elif learner == "sft":
      if summary.num_records:
        round_tasks.append(ctx.register(tasks.round_task_name(ctx.problem.name, r),
                                        ctx.path(f"round_{r}", "pseudo_labels.jsonl")))
      current = st.train(ctx, init, stages_lib.mixture(ctx, ctx.seed_task, "lmsi", r,
                                                       round_tasks),
                         out_dir, data_seed=ctx.data_seed(r),
                         extra_keys=("rounds.init",) if r > 1 else ())
    ev = st.evaluate(ctx, current, ctx.path(f"round_{r}", "eval.json"), c.eval.temperature, r)
    rows.append(results.RoundResult.of(r, summary, ev, ctx.train_done(f"round_{r}", "train"),
                                       gen))
    stopping = stop.update(r, ev.greedy_acc)
    if guard:
      signals = st.probe(ctx, current, r, signals)
      stopping |= guard.update(signals)
      rows[-1] = dataclasses.replace(rows[-1], guard=guard.history[-1])
      if guard.stopped_after == r:     # keep the last unflagged model
        current = previous_lm
    wandb_logger.log_round(c, ctx.path(f"round_{r}"), rows[-1].to_dict())  # no-op without W&B
    if stopping:
      break
    previous_lm = current
  return results.LmsiResult(rows, guard.kept_round if guard else len(rows), current,
                            round_records, early_stop=stop.report(),
                            collapse_guard=guard.report() if guard else None)


def run_arm(ctx: RunContext, arm: str, base: results.BaseResult, lmsi: results.LmsiResult,
            st: Stages = STAGES) -> results.EvalResult | None:
  """Same recipe, as many rounds as the kept LMSI model, from the base model.

  oracle: gold CoT for the same pool; control: the seed data only; spurious: LMSI's own
  samples of each round, but the paths of a random non-majority answer (as many as LMSI
  kept; `pseudo_labels.spurious_pool`): if it gains as much as LMSI, the gain is format
  learning, not self-improvement.
  """
  if arm == "control" and ctx.seed_task is None:
    logging.warning("control arm skipped: the task has no labeled seed data")
    return None
  num_rounds = lmsi.final_round
  current, round_tasks = base.lm, []
  for r in range(1, num_rounds + 1):
    if arm == "oracle":
      round_tasks.append(stages_lib.oracle_labels(ctx, r))
    elif arm == "spurious" and lmsi.round_records[r]:   # as many records as LMSI's round r
      round_tasks.append(stages_lib.spurious_labels(ctx, r))
    init = current if ctx.cfg.rounds.init == "continue" else base.lm
    current = st.train(ctx, init, stages_lib.mixture(ctx, ctx.seed_task, arm, r, round_tasks),
                       ctx.path(arm, f"round_{r}", "train"), data_seed=ctx.data_seed(r),
                       extra_keys=("rounds.init",) if r > 1 else ())
  res = st.evaluate(ctx, current, ctx.path(arm, "eval.json"), ctx.cfg.eval.temperature, 100)
  train_s = sum(ctx.train_done(arm, f"round_{r}", "train")["wall_s"]
                for r in range(1, num_rounds + 1))
  return res.with_wall_s(res.wall_s + train_s)   # the arm's fine-tunes and its eval


def lmsi_report(ctx: RunContext, base: results.BaseResult, lmsi: results.LmsiResult,
                arms: dict, t0: float) -> dict:
  """report.json of an LMSI run (lmsi_jax/report.py documents its keys)."""
  arm = lambda name: arms[name].to_dict() if arms.get(name) is not None else None
  report = report_lib.build_report(ctx.cfg, base.eval.to_dict(), lmsi.rows(), arm("oracle"),
                                   arm("control"), spurious=arm("spurious"),
                                   final_round=lmsi.final_round, wall_s=ctx.store.wall_s(),
                                   wall_s_this_invocation=time.time() - t0)
  report["early_stop"] = lmsi.early_stop
  report["collapse_guard"] = lmsi.collapse_guard
  report["skipped"] = ctx.problem.skipped     # records dropped under data.on_error="skip"
  return report


class Pipeline:
  """The LMSI run (`config.mode="lmsi"`): base → rounds → arms, then the report.

  A thin runner over a RunContext (`.ctx`; its fields read as attributes, e.g.
  `pipeline.base_lm`, `pipeline.vocab`). `restart_from`: a stage name (see
  DIR/stages.json) to start over with the stages after it, as main.py's
  --restart_from. `store`/`view`: a runner driving several contexts shares one store.
  `sampler`: what samples every stage (tests: `lmsi_jax.testing.ScriptedSampler`);
  `stages`: the stage functions (tests: `dataclasses.replace(rounds.STAGES, ...)`).
  """

  def __init__(self, cfg, workdir: str, restart_from: str = "", store=None, view: str = "",
               *, sampler=None, stages: Stages = STAGES):
    self.ctx = build_context(cfg, workdir, restart_from=restart_from, store=store, view=view,
                             sampler=sampler)
    self.stages = stages

  @classmethod
  def from_context(cls, ctx: RunContext, stages: Stages = STAGES) -> "Pipeline":
    """A runner over an existing context (e.g. another workdir, or stand-in stages)."""
    p = cls.__new__(cls)
    p.ctx, p.stages = ctx, stages
    return p

  def __getattr__(self, name):
    if name == "ctx":
      raise AttributeError(name)
    return getattr(self.ctx, name)

  def run(self) -> dict:
    t0, ctx, st = time.time(), self.ctx, self.stages
    base = run_base(ctx, st)
    ctx = base.ctx
    lmsi = run_lmsi(ctx, base, st)
    arms = {arm: run_arm(ctx, arm, base, lmsi, st) for arm in ARMS
            if ctx.cfg.eval[arm] and lmsi.final_round}
    report = lmsi_report(ctx, base, lmsi, arms, t0)
    if distributed.is_main_process():
      report_lib.write_report(report, ctx.workdir)
    return report

  to_markdown = staticmethod(report_lib.to_markdown)


def run(cfg, workdir: str, **kw) -> dict:
  """Runs (or resumes) the whole pipeline; returns the report dict."""
  return Pipeline(cfg, workdir, **kw).run()
