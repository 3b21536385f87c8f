"""`config.mode="learners"`: the learners of `config.learners.compare` from one base model.

Stage 0 and the base evaluation run once (`rounds.run_base`); then each learner
runs the configured rounds from that base in DIR/<learner>/ (a child context:
same model, data, seeds and evaluation; `rounds.learner` set). sft and vote_dpo
sample round 1 with the same model and keys, so vote_dpo reads sft's round-1
samples (one vote store). The sft learner's spurious-label arm runs when
`eval.spurious` (the arm applies to pseudo-labels only).

report.json: the usual keys (its `rounds` are the first learner's) plus
`learners`: {name: {rounds: [round rows], final {round, greedy_acc, sc_acc},
sampled_tokens (every round's sampling: the learner's budget), wall_s (its own
rounds' stages; round-1 samples shared with vote_dpo count for sft), spurious (sft
only, or null)}}. report.md gets a learners table and
learners.png plots them side by side (report.plot_learners).
"""

from __future__ import annotations

import time

from lmsi_jax import context as context_lib
from lmsi_jax import diagnostics
from lmsi_jax import distributed
from lmsi_jax import report as report_lib
from lmsi_jax import rounds as rounds_lib


class LearnerComparison:
  """The runner of mode "learners" (lmsi_jax/modes.py)."""

  def __init__(self, cfg, workdir: str, *, sampler=None, stages=rounds_lib.STAGES):
    self.cfg, self.workdir, self.stages = cfg, workdir, stages
    self.ctx = context_lib.build_context(cfg, workdir, sampler=sampler)
    for name, scfg, _ in self.settings():     # every learner's recorded stages, before work
      self.ctx.store.check(scfg, view=name)

  def settings(self) -> list[tuple[str, object, dict]]:
    names = tuple(self.cfg.learners.compare)
    out = []
    for name in names:
      c = self.cfg.copy_and_resolve_references()
      c.rounds.learner = name
      if name != "sft":
        c.eval.spurious = False
      shared = ({("round_1", "samples"): self.ctx.path("sft")}
                if name == "vote_dpo" and "sft" in names else {})
      out.append((name, c, shared))
    return out

  def run(self) -> dict:
    t0 = time.time()
    base = rounds_lib.run_base(self.ctx, self.stages)
    ctx = base.ctx
    table, first = {}, None
    for name, cfg, shared in self.settings():
      s = ctx.child(cfg, name, shared)
      lmsi = rounds_lib.run_lmsi(s, base, self.stages)
      rows = lmsi.rows()
      spurious = None
      if cfg.eval.spurious and lmsi.final_round:
        spurious = rounds_lib.run_arm(s, "spurious", base, lmsi, self.stages)
      last = rows[lmsi.final_round - 1] if lmsi.final_round else base.eval.to_dict()
      own = {n for n in s.store.entries()       # its rounds (its arm is reported apart)
             if n.startswith(name + "/") and not n.startswith(f"{name}/spurious/")}
      table[name] = {
          "rounds": rows,
          "final": {"round": lmsi.final_round, "greedy_acc": last["greedy_acc"],
                    "sc_acc": last["sc_acc"]},
          "sampled_tokens": int(sum(r.get("sampled_tokens", 0) for r in rows)),
          "wall_s": s.store.wall_s(own),
          "spurious": None if spurious is None else {
              "greedy_acc": spurious.greedy_acc, "sc_acc": spurious.sc_acc}}
      first = first or rows
    rep = report_lib.build_report(self.cfg, base.eval.to_dict(), first or [], None, None,
                                  wall_s=ctx.store.wall_s(),
                                  wall_s_this_invocation=time.time() - t0)
    rep["mode"] = "learners"
    rep["learners"] = table
    if distributed.is_main_process():
      report_lib.write_report(rep, self.workdir, sections=(markdown,))
      report_lib.plot_learners(rep, self.workdir)
    return rep

  def to_markdown(self, rep: dict) -> str:
    return report_lib.to_markdown(rep, sections=(markdown,))


def markdown(rep: dict) -> list[str]:
  """report.md's learners table: per learner and round, greedy / SC accuracy, label
  precision (the vote is right), reward accuracy (vote_rl), sampled tokens, wall time."""
  table = rep.get("learners")
  if not table:
    return []
  pct = diagnostics.pct
  b = rep["base"]
  lines = ["", "## Learners (one vote store, same base, same evaluation)", "",
           "| learner | round | greedy CoT | SC | label precision | reward accuracy | "
           "sampled tokens | wall (s) |", "|---|---|---|---|---|---|---|---|",
           f"| base | 0 | {pct(b['greedy_acc'])} | {pct(b['sc_acc'])} | | | | |"]
  for name, v in table.items():
    for r in v["rounds"]:
      lines.append(f"| {name} | {r['round']} | {pct(r['greedy_acc'])} | {pct(r['sc_acc'])} | "
                   f"{pct(r.get('pseudo_label_precision'))} | {pct(r.get('reward_accuracy'))} | "
                   f"{r.get('sampled_tokens', 0)} | {r['wall_s']:.0f} |")
    if v.get("spurious"):
      sp = v["spurious"]
      lines.append(f"| {name} spurious arm | | {pct(sp['greedy_acc'])} | {pct(sp['sc_acc'])} "
                   "| | | | |")
  return lines
