"""The run report: report.json (a contract other tools read), report.md, plots.

report.json keys: config, base {greedy_acc, sc_acc, ...}, rounds [{round,
greedy_acc, sc_acc, num_questions, num_pseudo_labels,
pseudo_label_precision, mean_vote_share, wall_s, ...}], oracle {greedy_acc,
sc_acc}, control {greedy_acc, sc_acc}, spurious {greedy_acc, sc_acc}, final
{round, greedy_acc, sc_acc} (the kept model: the last round, or the collapse
guard's choice), gains {over_base, over_control, over_spurious} (final greedy
minus each, fractions), pgr (on final), calibration, wall_s, early_stop (null
unless rounds.early_stop_patience > 0; see early_stop.py), collapse_guard (null
unless guard.probe_n > 0; see guard.py). Mode "learners" adds `learners`
{name: {rounds, final, sampled_tokens, wall_s, spurious}} (learners/compare.py)
and learners.png; rounds rows carry `sampled_tokens` (and vote_rl's
`reward_accuracy`, `mean_reward`).
base, each round and the arms also carry "extraction" (see
evaluate.extraction_summary): {extractor, greedy_unextracted, greedy_paths,
sc_unextracted, sc_paths, greedy_others: {name: {acc, unextracted, disagree}}, unavailable};
report.md shows it as the "Answer extraction" table.
Accuracies and shares are fractions in [0, 1]. The per-round pool
diagnostics (pass@k, maj@k, precision, distinct answers/paths) are a report.md
section and diagnostics.png (lmsi_jax/diagnostics.py).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence

from lmsi_jax import diagnostics
from lmsi_jax import fileio
from lmsi_jax.diagnostics import pct

_EVAL_KEYS = ("greedy_acc", "sc_acc", "num_questions", "sc_num_samples", "sc_temperature",
              "mean_vote_share", "greedy_parse_rate", "calibration", "extraction", "wall_s")


def _eval_view(ev: dict | None) -> dict | None:
  return None if ev is None else {k: ev[k] for k in _EVAL_KEYS if k in ev}


def pgr(base: float, final: float, oracle: float | None) -> float | None:
  """Performance gap recovered: (final - base) / (oracle - base)."""
  if oracle is None or oracle - base <= 1e-9:
    return None
  return (final - base) / (oracle - base)


def build_report(cfg, base: dict, rounds: list[dict], oracle: dict | None, control: dict | None,
                 *, wall_s: float, wall_s_this_invocation: float, spurious: dict | None = None,
                 final_round: int | None = None) -> dict:
  """`wall_s`: the recorded stage times summed (what an uninterrupted run takes).

  `final_round` is the kept model (default: the last round; 0 = stage 0).
  """
  k = len(rounds) if final_round is None else final_round
  last = rounds[k - 1] if k else None
  final = last or base
  gains = {f"over_{name}": final["greedy_acc"] - arm["greedy_acc"]
           for name, arm in (("base", base), ("control", control), ("spurious", spurious)) if arm}
  return {
      "config": json.loads(cfg.to_json()),
      "base": _eval_view(base),
      "rounds": rounds,
      "oracle": _eval_view(oracle),
      "control": _eval_view(control),
      "spurious": _eval_view(spurious),
      "final": {"round": k, "greedy_acc": final["greedy_acc"], "sc_acc": final["sc_acc"]},
      "gains": gains,
      "pgr": pgr(base["greedy_acc"], last["greedy_acc"], oracle and oracle["greedy_acc"])
             if last else None,
      "pgr_sc": pgr(base["sc_acc"], last["sc_acc"], oracle and oracle["sc_acc"]) if last else None,
      "calibration": final["calibration"],
      "base_calibration": base["calibration"],
      "wall_s": wall_s,
      "wall_s_this_invocation": wall_s_this_invocation,
  }


def to_markdown(rep: dict, sections: Sequence[Callable[[dict], list[str]]] = ()) -> str:
  """report.md of an LMSI run; `sections`: the runner's own (e.g. a study's tables), each a
  function of the report returning markdown lines, appended in order."""
  lines = ["# LMSI run report", "",
           "| model | greedy CoT | self-consistency | pseudo-label precision | mean vote share | wall (s) |",
           "|---|---|---|---|---|---|"]
  b = rep["base"]
  lines.append(f"| base | {pct(b['greedy_acc'])} | {pct(b['sc_acc'])} | | | {b.get('wall_s', 0):.0f} |")
  for r in rep["rounds"]:
    lines.append(f"| LMSI round {r['round']} | {pct(r['greedy_acc'])} | {pct(r['sc_acc'])} | "
                 f"{pct(r['pseudo_label_precision'])} | {pct(r['mean_vote_share'])} | "
                 f"{r['wall_s']:.0f} |")
  for arm in ("oracle", "control", "spurious"):
    if rep.get(arm):
      lines.append(f"| {arm} | {pct(rep[arm]['greedy_acc'])} | {pct(rep[arm]['sc_acc'])} | | | "
                   f"{rep[arm].get('wall_s', 0):.0f} |")
  fmt = lambda x: "—" if x is None else f"{x:.2f}"
  final = rep.get("final") or {}
  gains = ", ".join(f"{100 * v:+.1f} points {k.replace('_', ' ')}"
                    for k, v in (rep.get("gains") or {}).items())
  lines += ["", f"Final model: round {final.get('round')} ({gains or 'no arms'}). "
                f"PGR (greedy): {fmt(rep['pgr'])}; PGR (SC): {fmt(rep.get('pgr_sc'))}; "
                f"total stage wall time {rep['wall_s']:.0f} s.", "",
            "Calibration of the last model (SC vote share → accuracy of the majority answer):", "",
            "| vote share | questions | accuracy |", "|---|---|---|"]
  for c in rep["calibration"]:
    lines.append(f"| {c['lo']:.1f}–{c['hi']:.1f} | {c['count']} | {pct(c['accuracy'])} |")
  lines += extraction_markdown(rep)
  lines += diagnostics.markdown(rep)
  lines += _guard_markdown(rep.get("collapse_guard"))
  for section in sections:
    lines += section(rep)
  return "\n".join(lines) + "\n"


def extraction_markdown(rep: dict) -> list[str]:
  """The "Answer extraction" table: unextracted counts and the other extractors' disagreements."""
  rows = [("base", rep.get("base"))]
  rows += [(f"LMSI round {r['round']}", r) for r in rep.get("rounds") or []]
  rows += [(arm, rep.get(arm)) for arm in ("oracle", "control", "spurious")]
  rows = [(name, ev["extraction"]) for name, ev in rows if ev and ev.get("extraction")]
  if not rows:
    return []
  chosen = rows[0][1]["extractor"]
  others = list(dict.fromkeys(n for _, x in rows for n in x.get("greedy_others", {})))
  unavailable = sorted({n for _, x in rows for n in x.get("unavailable", [])})
  lines = ["", f"Answer extraction (task.extractor = {chosen}). Unextracted: outputs with no "
               "answer; each other extractor: greedy outputs it reads differently from "
               f"{chosen} (its greedy accuracy).", "",
           "| model | greedy unextracted | SC paths unextracted |" + "".join(f" {o} |" for o in others),
           "|---|---|---|" + "---|" * len(others)]
  for name, x in rows:
    cells = [name, f"{x['greedy_unextracted']}/{x['greedy_paths']}",
             f"{x['sc_unextracted']}/{x['sc_paths']}"]
    for o in others:
      d = x.get("greedy_others", {}).get(o)
      cells.append("—" if d is None else f"{d['disagree']} ({pct(d['acc'])})")
    lines.append("| " + " | ".join(cells) + " |")
  if unavailable:
    lines += ["", f"Not compared (package not installed): {', '.join(unavailable)}."]
  return lines


def _guard_markdown(g: dict | None) -> list[str]:
  if not g:
    return []
  f = lambda x: "—" if x is None else f"{x:.3f}"
  lines = ["", f"Collapse guard (no labels; {g['probe_n']} held-out probe questions; a round is "
               "flagged when its agreement with the previous model is more than "
               f"{g['max_drop']} below the previous model's split-half agreement):", "",
           "| model | vote share | answer entropy | distinct paths | parse rate | split-half "
           "agreement | agreement with previous | flagged |", "|---|---|---|---|---|---|---|---|"]
  for e in g["rounds"]:
    lines.append(f"| {'base' if e['round'] == 0 else 'round ' + str(e['round'])} | "
                 f"{f(e['mean_vote_share'])} | {f(e['answer_entropy'])} | {f(e['distinct_paths'])} | "
                 f"{f(e['parse_rate'])} | {f(e['self_agreement'])} | {f(e['agreement'])} | "
                 f"{'yes' if e['flagged'] else 'no'} |")
  stop = g["stopped_after_round"]
  lines += ["", ("Ran every configured round." if stop is None else
                 f"Stopped after round {stop}.") + f" Kept round {g['kept_round']}."]
  return lines


def plot(rep: dict, workdir: str) -> list[str]:
  """accuracy.png (per round, greedy and SC, base/oracle lines) and calibration.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  xs = [0] + [r["round"] for r in rep["rounds"]]
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, style in (("greedy_acc", "greedy CoT", "o-"), ("sc_acc", "self-consistency", "s-")):
    ax.plot(xs, [rep["base"][key]] + [r[key] for r in rep["rounds"]], style, label=f"LMSI {label}")
  ax.axhline(rep["base"]["sc_acc"], color="gray", ls=":", label="base SC")
  if rep.get("oracle"):
    ax.axhline(rep["oracle"]["greedy_acc"], color="green", ls="--", label="oracle greedy")
  if rep.get("control"):
    ax.axhline(rep["control"]["greedy_acc"], color="red", ls="--", label="control greedy")
  if rep.get("spurious"):
    ax.axhline(rep["spurious"]["greedy_acc"], color="purple", ls="--", label="spurious greedy")
  ax.set(xlabel="round (0 = base)", ylabel="accuracy", ylim=(0, 1), title="Held-out accuracy")
  ax.set_xticks(xs)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(save_png(fig, os.path.join(workdir, "accuracy.png")))

  fig, ax = plt.subplots(figsize=(5, 4))
  for name, cal in (("base", rep["base_calibration"]), ("last round", rep["calibration"])):
    pts = [((c["lo"] + c["hi"]) / 2, c["accuracy"]) for c in cal if c["accuracy"] is not None]
    if pts:
      ax.plot(*zip(*pts), "o-", label=name)
  ax.plot([0, 1], [0, 1], color="gray", ls=":")
  ax.set(xlabel="vote share of the majority answer", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
         title="Calibration (self-consistency)")
  if ax.get_legend_handles_labels()[0]:    # no curve when no bin has questions
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(save_png(fig, os.path.join(workdir, "calibration.png")))
  paths += [p for p in [diagnostics.plot(rep, workdir, save_png)] if p]
  return paths


def plot_learners(rep: dict, workdir: str) -> str | None:
  """learners.png: greedy and SC accuracy per round of each learner (mode "learners"),
  side by side, from the same base."""
  table = rep.get("learners")
  if not table:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, key, title in zip(axes, ("greedy_acc", "sc_acc"), ("greedy CoT", "self-consistency")):
    for name, v in table.items():
      xs = [0] + [r["round"] for r in v["rounds"]]
      ax.plot(xs, [rep["base"][key]] + [r[key] for r in v["rounds"]], "o-", label=name)
    ax.set(xlabel="round (0 = base)", ylabel="accuracy", ylim=(0, 1), title=title)
    ax.set_xticks(sorted({0} | {r["round"] for v in table.values() for r in v["rounds"]}))
    ax.legend(fontsize=8)
  fig.tight_layout()
  return save_png(fig, os.path.join(workdir, "learners.png"))


def save_png(fig, path: str) -> str:
  """Writes `fig` as a PNG atomically (local or gs://), closes it; returns `path`."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  fileio.write_atomic(path, [buf.getvalue()])
  return path


def write_json(rep: dict, workdir: str) -> None:
  fileio.write_text_atomic(os.path.join(workdir, "report.json"),
                           json.dumps(rep, indent=1, sort_keys=True))


def write_report(rep: dict, workdir: str,
                 sections: Sequence[Callable[[dict], list[str]]] = ()) -> None:
  """Writes report.json, report.md (with the runner's `sections`) and the plots (process 0
  only; caller checks)."""
  write_json(rep, workdir)
  fileio.write_text_atomic(os.path.join(workdir, "report.md"), to_markdown(rep, sections))
  plot(rep, workdir)
