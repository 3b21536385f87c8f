"""Studies on one base model: the format ablation (LMSI Table 5) and round strategies.

`config.mode="format_ablation"`: stage 0 and the base evaluation run once
(`rounds.run_base`, seed data in `config.formats`); then, from that base,
the configured LMSI rounds run once per setting, each turning the same voted
paths into pseudo-labels of different formats:

  no_cot             few_shot_direct + zero_shot_direct (LMSI "w/o CoT formats")
  few_shot_cot_only  few_shot_cot
  all_four           the four formats of Table 2

Everything else is identical (training recipe, data mix and order, sampling
and evaluation seeds). Round 1 samples the same prompts with the same model
and keys in every setting, so they share its samples (DIR/round_1/samples).
Each setting reports greedy and SC accuracy with `prompt_format` (CoT
prompting) and greedy accuracy with the direct prompt (few-shot when the task
has exemplars: Table 5's "standard prompting" column).

`config.mode="strategies"`: the same for `rounds.init` = "continue" (each
round starts from the last) vs "restart" (each round starts from the base
model). Round 1 is the same run for both (same start, data and seeds), so the
restart setting reads continue's round 1.

Layout: DIR/base/, DIR/data/, DIR/<setting>/round_<r>/... (as in rounds.py),
DIR/<setting>/direct_eval.json, DIR/report.json (`format_ablation` or
`strategies`: {setting: {greedy_acc, sc_acc, direct_greedy_acc, wall_s (the
setting's own stages: a shared round counts once), ...}}; `rounds`
is the all_four / continue setting's), report.md, the usual plots. Resumable
stage by stage like the pipeline.
"""

from __future__ import annotations

import abc
import os
import time

import numpy as np

from lmsi_jax import context as context_lib
from lmsi_jax import diagnostics
from lmsi_jax import distributed
from lmsi_jax import evaluate as eval_lib
from lmsi_jax import fileio
from lmsi_jax import formats as formats_lib
from lmsi_jax import report as report_lib
from lmsi_jax import results
from lmsi_jax import rounds as rounds_lib

FORMAT_SETTINGS = (("no_cot", ("few_shot_direct", "zero_shot_direct")),
                   ("few_shot_cot_only", ("few_shot_cot",)),
                   ("all_four", formats_lib.FORMATS))
STRATEGIES = ("continue", "restart")


def direct_eval(ctx, lm, out_path: str) -> results.DirectEvalResult:
  """Greedy accuracy with the direct prompt ("standard prompting"), cached in out_path."""
  st = ctx.stage(out_path, context_lib.EVAL_KEYS, exclude=context_lib.EVAL_EXCLUDE,
                 inputs=[ctx.origin(lm), ctx.exemplar_stage()])
  if st.done:
    return results.DirectEvalResult.from_dict(fileio.read_json(out_path))
  st.begin(out_path)
  fmt = "few_shot_direct" if ctx.problem.exemplars is not None else "zero_shot_direct"
  qs = ctx.problem.eval
  s = ctx.eval_settings(0.0)
  prompts = [formats_lib.build_input(fmt, q["question"], ctx.problem.exemplars) for q in qs]
  _, _, ok = eval_lib.greedy(ctx.sampler_for(lm), qs, prompts, s, seed=ctx.cfg.seed)
  res = {"prompt_format": fmt, "greedy_acc": float(np.mean(ok)), "wall_s": st.elapsed()}
  distributed.write_json(out_path, res)
  st.finish(out_path, wall_s=res["wall_s"])
  return results.DirectEvalResult.from_dict(res)


class _Study(abc.ABC):
  """Base once, then `settings()` from it, each a child context of the base's (same
  model, data, seed task, exemplars; its own config and directory DIR/<name>/, some
  paths shared with another setting); `key` names the report entry."""
  key: str

  def __init__(self, cfg, workdir: str, *, sampler=None, stages=rounds_lib.STAGES):
    self.cfg, self.workdir, self.stages = cfg, workdir, stages
    self.ctx = context_lib.build_context(cfg, workdir, sampler=sampler)
    for name, scfg, _ in self.settings():    # every setting's recorded stages, before any work
      self.ctx.store.check(scfg, view=name)

  @abc.abstractmethod
  def settings(self) -> list[tuple[str, object, dict]]:
    """(name, config, shared round directories) for each setting, in report order."""

  def run(self) -> dict:
    t0 = time.time()
    base = rounds_lib.run_base(self.ctx, self.stages)
    ctx = base.ctx
    base_direct = direct_eval(ctx, base.lm, ctx.path("base", "direct_eval.json"))
    table, all_rounds = {}, {}
    for name, cfg, shared in self.settings():
      s = ctx.child(cfg, name, shared)
      lmsi = rounds_lib.run_lmsi(s, base, self.stages)
      rows = lmsi.rows()
      direct = direct_eval(s, lmsi.final_lm, s.path("direct_eval.json"))
      last = rows[-1] if rows else base.eval
      own = [r for r in rows if s.path(f"round_{r['round']}") == os.path.join(s.workdir,
                                                                              f"round_{r['round']}")]
      table[name] = {
          "formats": list(cfg.formats), "init": cfg.rounds.init, "num_rounds": len(rows),
          "greedy_acc": last["greedy_acc"], "sc_acc": last["sc_acc"],
          "direct_greedy_acc": direct.greedy_acc,
          "num_records": sum(r["num_records"] for r in rows),
          "rounds": [{k: r[k] for k in ("round", "greedy_acc", "sc_acc", "num_pseudo_labels",
                                        "pseudo_label_precision")} for r in rows],
          "early_stop": lmsi.early_stop,
          "wall_s": sum(r["wall_s"] for r in own) + direct.wall_s}   # its own stages
      all_rounds[name] = rows
    main = next(iter(all_rounds)) if self.key == "strategies" else "all_four"
    rep = report_lib.build_report(
        self.cfg, base.eval.to_dict(), all_rounds[main], None, None,
        wall_s=ctx.store.wall_s(),   # every stage once (the store's ledger)
        wall_s_this_invocation=time.time() - t0)
    rep.update(mode=self.cfg.mode, early_stop=table[main]["early_stop"])
    rep["base"]["direct_greedy_acc"] = base_direct.greedy_acc
    rep[self.key] = table
    if distributed.is_main_process():  # pylint: disable=protected-access
      report_lib.write_report(rep, self.workdir, sections=(markdown,))
    return rep

  def to_markdown(self, rep: dict) -> str:
    return report_lib.to_markdown(rep, sections=(markdown,))


class FormatAblation(_Study):
  """LMSI Table 5 on the configured task: which pseudo-label formats to train on."""
  key = "format_ablation"

  def __init__(self, cfg, workdir: str, **kw):
    missing = [f for f in formats_lib.FORMATS if f not in cfg.formats]
    if missing:
      raise ValueError(f"config.formats={tuple(cfg.formats)!r}: the format ablation trains the "
                       f"base on the seed data in all four formats; add {missing}")
    super().__init__(cfg, workdir, **kw)

  def settings(self):
    shared = {("round_1", "samples"): self.workdir, ("round_1", "selfgen"): self.workdir}
    out = []
    for name, fmts in FORMAT_SETTINGS:
      c = self.cfg.copy_and_resolve_references()
      c.formats = fmts
      out.append((name, c, shared))
    return out


class StrategyComparison(_Study):
  """rounds.init = continue vs restart, from one base model."""
  key = "strategies"

  def settings(self):
    out = []
    for name in STRATEGIES:
      c = self.cfg.copy_and_resolve_references()
      c.rounds.init = name
      shared = {} if name == STRATEGIES[0] else {("round_1",): os.path.join(self.workdir,
                                                                            STRATEGIES[0])}
      out.append((name, c, shared))
    return out


def markdown(rep: dict) -> list[str]:
  """report.md tables of a study (format ablation and/or strategies)."""
  pct = diagnostics.pct
  lines = []
  for key, title, what in (("format_ablation", "Format ablation (LMSI Table 5)", "formats"),
                           ("strategies", "Round strategies", "init")):
    table = rep.get(key)
    if not table:
      continue
    b = rep["base"]
    lines += ["", f"## {title}", "",
              f"| setting | {what} | rounds | greedy CoT | SC | direct (greedy) | "
              "pseudo-label records | wall (s) |", "|---|---|---|---|---|---|---|---|",
              f"| base (w/o LMSI) | | 0 | {pct(b['greedy_acc'])} | {pct(b['sc_acc'])} | "
              f"{pct(b.get('direct_greedy_acc'))} | | |"]
    for name, v in table.items():
      desc = ", ".join(v["formats"]) if what == "formats" else v["init"]
      lines.append(f"| {name} | {desc} | {v['num_rounds']} | {pct(v['greedy_acc'])} | "
                   f"{pct(v['sc_acc'])} | {pct(v['direct_greedy_acc'])} | {v['num_records']} | "
                   f"{v['wall_s']:.0f} |")
    if key == "strategies":
      lines += ["", "| round | " + " | ".join(f"{n} greedy / SC" for n in table) + " |",
                "|---|" + "---|" * len(table)]
      n = max(len(v["rounds"]) for v in table.values())
      for i in range(n):
        cells = [f"{pct(v['rounds'][i]['greedy_acc'])} / {pct(v['rounds'][i]['sc_acc'])}"
                 if i < len(v["rounds"]) else "" for v in table.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
  return lines
