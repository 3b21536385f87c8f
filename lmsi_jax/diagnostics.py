"""Per-round pool diagnostics of a report: a report.md section and diagnostics.png.

Every round row of report.json carries them (pseudo_labels.summarize_votes on
the round's pool): pass_at_k (some sampled path reaches the gold answer),
maj_at_k (the majority answer is gold), pseudo_label_precision (the same over
questions with a majority answer), mean_vote_share, mean_distinct_answers and
mean_distinct_paths (exploration), num_pseudo_labels (kept paths). With
self-generated questions, the round's "selfgen" entry too. Gold answers score
these numbers and nothing else.
"""

from __future__ import annotations

import os


def pct(x) -> str:
  """A fraction as a markdown table cell (`0.123` -> `12.3%`, None -> `—`)."""
  return "—" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
  return "—" if x is None else f"{x:.2f}"


def markdown(rep: dict) -> list[str]:
  """Lines for report.md: the diagnostics table, self-generated questions, early stop."""
  rows = rep.get("rounds") or []
  lines = []
  if rows:
    lines += ["", "Pool diagnostics per round (k = samples per question; gold only scores):", "",
              "| round | pass@k | maj@k | pseudo-label precision | mean vote share | "
              "distinct answers | distinct paths | kept paths |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['round']} | {pct(r.get('pass_at_k'))} | {pct(r.get('maj_at_k'))} | "
                   f"{pct(r.get('pseudo_label_precision'))} | {pct(r.get('mean_vote_share'))} | "
                   f"{_num(r.get('mean_distinct_answers'))} | {_num(r.get('mean_distinct_paths'))} | "
                   f"{r.get('num_pseudo_labels', '—')} |")
  gen = [r for r in rows if r.get("selfgen")]
  if gen:
    lines += ["", "Self-generated questions (LMSI §3.3):", "",
              "| round | written | empty | duplicates | too long | answered | kept | kept precision |",
              "|---|---|---|---|---|---|---|---|"]
    for r in gen:
      g = r["selfgen"]
      lines.append(f"| {r['round']} | {g.get('num_candidates')} | {g.get('num_empty')} | "
                   f"{g.get('num_duplicates')} | {g.get('num_too_long', 0)} | {g.get('num_new')} | "
                   f"{g.get('num_kept')} | "
                   f"{pct(g.get('kept_precision'))} |")
  es = rep.get("early_stop")
  if es:
    where = (f"stopped after round {es['stopped_after_round']}"
             if es["stopped_after_round"] is not None else "did not stop early")
    lines += ["", f"Early stopping (patience {es['patience']}): {where}: {es['reason']}; best "
                  f"greedy accuracy {pct(es['best_greedy_acc'])} at round {es['best_round']}."]
  return lines


def plot(rep: dict, workdir: str, save) -> str | None:
  """diagnostics.png: pass@k / maj@k / precision / vote share, and distinct answers / paths."""
  rows = rep.get("rounds") or []
  if not rows:
    return None
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  xs = [r["round"] for r in rows]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
  for key, label, style in (("pass_at_k", "pass@k", "^-"), ("maj_at_k", "maj@k", "o-"),
                            ("pseudo_label_precision", "pseudo-label precision", "s--"),
                            ("mean_vote_share", "mean vote share", "d:")):
    pts = [(x, r.get(key)) for x, r in zip(xs, rows) if r.get(key) is not None]
    if pts:
      ax.plot(*zip(*pts), style, label=label)
  ax.set(xlabel="round", ylabel="fraction of pool questions", ylim=(0, 1.02),
         title="Pool: oracle coverage vs voted labels")
  ax.set_xticks(xs)
  ax.legend(fontsize=8)
  for key, label, style in (("mean_distinct_answers", "distinct answers", "o-"),
                            ("mean_distinct_paths", "distinct paths", "s-")):
    bx.plot(xs, [r.get(key, 0.0) for r in rows], style, label=label)
  bx.set(xlabel="round", ylabel="mean per question", ylim=(0, None), title="Exploration")
  bx.set_xticks(xs)
  bx.legend(fontsize=8)
  fig.tight_layout()
  return save(fig, os.path.join(workdir, "diagnostics.png"))
