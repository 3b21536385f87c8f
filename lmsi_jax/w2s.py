"""Teacher → student: weak-to-strong generalisation and distillation (`config.mode="w2s"`).

Pseudo-labels made by one model (the teacher: `config.model`, trained on the
seed data by stage 0 when `base_train.enabled`) train another model of a
different size (the student: `config.w2s.student_*`). A bigger student is
weak-to-strong (Burns et al. 2023); a smaller one is distillation (LMSI
Table 7). Stages, each skipped when its output exists:

  DIR/w2s/teacher/base/train/, base/eval.json   teacher stage 0; weak_acc = its greedy accuracy
  DIR/w2s/teacher/round_1/...                   its labels for the pool: every majority-vote
                                                path (w2s.labels="vote", the LMSI labels) or
                                                its single greedy path ("greedy")
  DIR/w2s/student/data/{pretrain,gold}.jsonl    easy seed data; one gold CoT per pool question
  DIR/w2s/student/pretrain/train/, eval.json    student stage 0 on the *easy* seed data only
                                                (w2s.pretrain_steps > 0, base_train recipe)
  DIR/w2s/student/ceiling/train/, eval.json     student fine-tuned on gold CoT for the pool
  DIR/w2s/student/w2s_<loss>/train/, eval.json  student fine-tuned on the teacher's labels
                                                with each of w2s.losses (lmsi_jax/losses.py)
  DIR/report.json, report.md, w2s.png

Both fine-tunes use the identical recipe (`config.train`, the same data
order seed, evaluated with the same sampling seed); `w2s.replay_weight` mixes
the student's pretraining data into both. PGR = (w2s − weak) / (ceiling −
weak) on greedy accuracy (`pgr_sc`: on self-consistency accuracy).
"""

from __future__ import annotations

import json
import logging
import os
import time

from lmsi_jax import diagnostics
from lmsi_jax import distributed
from lmsi_jax import fileio
from lmsi_jax import losses as losses_lib
from lmsi_jax import problems
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import context as context_lib
from lmsi_jax import report as report_lib
from lmsi_jax import rounds
from lmsi_jax import seeds
from lmsi_jax import stages as stages_lib
from lmsi_jax import store as store_lib
from lmsi_jax.data import tasks

# What shapes a student fine-tune besides the rounds' training keys (store fingerprints).
W2S_TRAIN_KEYS = ("w2s.replay_weight", "w2s.conf_alpha_max", "w2s.conf_warmup_frac",
                  "w2s.conf_threshold")
EVAL_KEYS = ("greedy_acc", "sc_acc", "greedy_parse_rate", "mean_vote_share", "wall_s")


def teacher_config(cfg):
  """The teacher's pipeline config: `cfg`, with greedy labels if w2s.labels says so."""
  c = cfg.copy_and_resolve_references()
  if cfg.w2s.labels == "greedy":
    c.sampling.update(num_samples=1, temperature=0.0)
  return c


def student_config(cfg):
  """The student's pipeline config: its model, and stage 0 = w2s.pretrain_steps."""
  c = cfg.copy_and_resolve_references()
  w = cfg.w2s
  c.model.update(preset=w.student_preset, checkpoint=w.student_checkpoint)
  c.base_train.update(enabled=w.pretrain_steps > 0, num_steps=w.pretrain_steps)
  return c


def easy_seed(problem: problems.Problem) -> list[dict]:
  """The student's pretraining questions: the seed data's easy part (synthetic: 2-4 terms)."""
  return [q for q in problem.seed if q["id"].startswith("seed_easy")]


class W2S:
  """The runner of `config.mode="w2s"` (see lmsi_jax/modes.py)."""

  def __init__(self, cfg, workdir: str, *, sampler=None, stages=rounds.STAGES):
    self.cfg, self.workdir, self.stages = cfg, workdir, stages
    w = cfg.w2s
    self.losses = {name: losses_lib.make_loss(name, alpha_max=w.conf_alpha_max,
                                              warmup_frac=w.conf_warmup_frac,
                                              threshold=w.conf_threshold)
                   for name in w.losses}
    self.store = store_lib.open_store(workdir, cfg)      # one store for both contexts
    self.teacher = context_lib.build_context(
        teacher_config(cfg), os.path.join(workdir, "w2s", "teacher"), store=self.store,
        view="teacher", sampler=sampler)
    self.student = context_lib.build_context(
        student_config(cfg), os.path.join(workdir, "w2s", "student"), store=self.store,
        view="student", sampler=sampler)
    self.easy = easy_seed(self.student.problem)
    if (w.pretrain_steps or w.replay_weight) and not self.easy:
      raise ValueError("config.w2s.pretrain_steps / w2s.replay_weight need easy seed data "
                       "(task.name='synthetic' with synthetic.seed_easy_n > 0)")

  # ------------------------------------------------------------------ stages
  def teacher_labels(self, lm, steps: int) -> dict:
    """The teacher labels the pool (DIR/w2s/teacher/round_1/pseudo_labels.jsonl)."""
    summary = self.stages.sample_and_vote(self.teacher, lm, 1, steps)
    if not summary.num_records:
      raise ValueError("w2s: the teacher's labels are empty (no sample reached an answer; see "
                       f"{self.teacher.path('round_1', 'vote_summary.json')})")
    return summary

  def _task(self, name: str, path: str, make_records):
    s = self.student
    return stages_lib.labels_stage(s, path, make_records, f"lmsi_{s.problem.name}_w2s_{name}")

  def pretrain_student(self):
    """Student stage 0 on the easy seed data (if any steps), and its evaluation."""
    s, cfg = self.student, self.cfg
    self.pretrain_task = None
    if self.easy:
      self.pretrain_task = self._task(
          "pretrain", s.path("data", "pretrain.jsonl"),
          lambda: pl.gold_records(self.easy, exemplars=s.problem.exemplars, formats=cfg.formats,
                                  round_index=0))
    lm = s.base_lm
    if cfg.w2s.pretrain_steps:
      lm = self.stages.train(s, lm, self.pretrain_task, s.path("pretrain", "train"), base=True,
                             data_seed=seeds.stream(cfg.seed, "w2s_pretrain_data"))
    ev = self.stages.evaluate(s, lm, s.path("pretrain", "eval.json"), cfg.eval.temperature, 100)
    return lm, ev

  def finetune(self, lm, arm: str, task, loss_name: str = "xent") -> dict:
    """One student fine-tune (the identical recipe for every arm), evaluated."""
    s, cfg = self.student, self.cfg
    parts = [(task, 1.0 - cfg.w2s.replay_weight)]
    if cfg.w2s.replay_weight > 0:
      parts.append((self.pretrain_task, cfg.w2s.replay_weight))
    mix = tasks.register_mixture(f"lmsi_{s.problem.name}_w2s_{arm}_mix", parts)
    out = self.stages.train(s, lm, mix, s.path(arm, "train"), data_seed=seeds.stream(cfg.seed, "w2s_data"),
                            loss_fn=self.losses.get(loss_name), extra_keys=W2S_TRAIN_KEYS)
    # one sampling seed for every student evaluation: common random numbers
    return self.stages.evaluate(s, out, s.path(arm, "eval.json"), cfg.eval.temperature, 100)

  def run(self) -> dict:
    t0, cfg = time.time(), self.cfg
    teacher = rounds.run_base(self.teacher, self.stages)  # the weak model: stage 0, evaluated
    self.teacher = teacher.ctx
    weak = teacher.eval
    summary = self.teacher_labels(teacher.lm, teacher.steps)
    student_lm, student_base = self.pretrain_student()
    s = self.student
    gold = self._task("gold", s.path("data", "gold.jsonl"), lambda: pl.gold_records(
        problems.with_gold_cot(s.problem, s.problem.pool, seed=seeds.stream(cfg.seed, "gold_cot")),
        exemplars=s.problem.exemplars, formats=cfg.formats, round_index=1))
    ceiling = self.finetune(student_lm, "ceiling", gold)
    labels = s.register(f"lmsi_{s.problem.name}_w2s_teacher_labels",
                        self.teacher.path("round_1", "pseudo_labels.jsonl"))
    by_loss = {name: self.finetune(student_lm, f"w2s_{name}", labels, name)
               for name in cfg.w2s.losses}
    rep = {"config": json.loads(cfg.to_json()), "mode": "w2s",
           "w2s": self.summarize(weak, summary, student_base, ceiling, by_loss),
           "wall_s": self.recorded_wall_s(), "wall_s_this_invocation": time.time() - t0}
    if distributed.is_main_process():
      write_report(rep, self.workdir)
    return rep

  # ------------------------------------------------------------------ report
  def summarize(self, weak, summary, student_base, ceiling, by_loss) -> dict:
    view = lambda ev: {k: v for k, v in ev.to_dict().items() if k in EVAL_KEYS}
    t_params = self.teacher.base_lm.cfg.num_params()
    s_params = self.student.base_lm.cfg.num_params()
    first = by_loss[self.cfg.w2s.losses[0]]
    pgr = lambda ev, k: report_lib.pgr(weak[k], ev[k], ceiling[k])
    return {
        "weak_acc": weak["greedy_acc"], "w2s_acc": first["greedy_acc"],
        "ceiling_acc": ceiling["greedy_acc"], "pgr": pgr(first, "greedy_acc"),
        "weak_sc_acc": weak["sc_acc"], "w2s_sc_acc": first["sc_acc"],
        "ceiling_sc_acc": ceiling["sc_acc"], "pgr_sc": pgr(first, "sc_acc"),
        "student_base_acc": student_base["greedy_acc"],
        "student_base_sc_acc": student_base["sc_acc"],
        "loss": self.cfg.w2s.losses[0],
        "by_loss": {n: {**view(ev), "pgr": pgr(ev, "greedy_acc"), "pgr_sc": pgr(ev, "sc_acc")}
                    for n, ev in by_loss.items()},
        "direction": "weak_to_strong" if s_params > t_params else "distillation",
        "teacher": {"model": _model_name(self.teacher.cfg), "num_params": t_params,
                    **view(weak)},
        "student": {"model": _model_name(self.student.cfg), "num_params": s_params},
        "student_base": view(student_base), "ceiling": view(ceiling),
        "labels": self.cfg.w2s.labels,
        "teacher_label_precision": summary["pseudo_label_precision"],
        "teacher_labeled_questions": summary["num_voted"],
        "teacher_label_paths": summary["num_pseudo_labels"],
        "num_pool_questions": summary["num_questions"],
    }

  def recorded_wall_s(self) -> float:
    """Sum of the recorded stage times of this run (the store's ledger; survives resumes)."""
    return self.store.wall_s()

  def to_markdown(self, rep: dict) -> str:
    return to_markdown(rep)


def _model_name(cfg) -> str:
  return cfg.model.checkpoint or cfg.model.preset


def to_markdown(rep: dict) -> str:
  w = rep["w2s"]
  pct = diagnostics.pct
  num = lambda x: "—" if x is None else f"{x:.2f}"
  t, s = w["teacher"], w["student"]
  lines = [f"# Teacher → student report ({w['direction'].replace('_', '-')})", "",
           f"Teacher `{t['model']}` ({t['num_params']:,} params) → student `{s['model']}` "
           f"({s['num_params']:,} params); teacher labels: {w['labels']} "
           f"({w['teacher_label_paths']} paths for {w['teacher_labeled_questions']} of "
           f"{w['num_pool_questions']} pool questions, precision "
           f"{pct(w['teacher_label_precision'])}).", "",
           "| model | greedy CoT | self-consistency | PGR (greedy) | PGR (SC) |",
           "|---|---|---|---|---|",
           f"| teacher (weak) | {pct(w['weak_acc'])} | {pct(w['weak_sc_acc'])} | | |",
           f"| student, pretrained only | {pct(w['student_base_acc'])} | "
           f"{pct(w['student_base_sc_acc'])} | | |"]
  for name, r in w["by_loss"].items():
    lines.append(f"| student on teacher labels ({name}) | {pct(r['greedy_acc'])} | "
                 f"{pct(r['sc_acc'])} | {num(r['pgr'])} | {num(r['pgr_sc'])} |")
  lines += [f"| student on gold (ceiling) | {pct(w['ceiling_acc'])} | {pct(w['ceiling_sc_acc'])}"
            " | | |", "", f"PGR = (student on teacher labels − teacher) / (ceiling − teacher); "
            f"total stage wall time {rep['wall_s']:.0f} s."]
  return "\n".join(lines) + "\n"


def plot(rep: dict, path: str) -> None:
  """w2s.png: greedy and SC accuracy of teacher, student base, students, ceiling."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  w = rep["w2s"]
  rows = [("teacher", w["weak_acc"], w["weak_sc_acc"]),
          ("student\npretrained", w["student_base_acc"], w["student_base_sc_acc"])]
  rows += [(f"student\n{n}", r["greedy_acc"], r["sc_acc"]) for n, r in w["by_loss"].items()]
  rows.append(("student\ngold", w["ceiling_acc"], w["ceiling_sc_acc"]))
  fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 1.5, 4))
  xs = range(len(rows))
  ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="greedy CoT")
  ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="self-consistency")
  ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
  ax.set(ylabel="held-out accuracy", ylim=(0, 1),
         title=f"{w['direction'].replace('_', '-')}: PGR {w['pgr'] if w['pgr'] is None else round(w['pgr'], 2)}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  report_lib.save_png(fig, path)


def write_report(rep: dict, workdir: str) -> None:
  fileio.write_text_atomic(os.path.join(workdir, "report.json"),
                           json.dumps(rep, indent=1, sort_keys=True))
  fileio.write_text_atomic(os.path.join(workdir, "report.md"), to_markdown(rep))
  plot(rep, os.path.join(workdir, "w2s.png"))
  logging.info("w2s: weak %.3f -> student %.3f (ceiling %.3f), PGR %s", rep["w2s"]["weak_acc"],
               rep["w2s"]["w2s_acc"], rep["w2s"]["ceiling_acc"], rep["w2s"]["pgr"])
