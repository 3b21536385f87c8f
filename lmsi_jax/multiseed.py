"""Seeds as a first-class feature: run one config under N seeds, report mean ± sd.

  python -m lmsi_jax.main --config=configs/demo.py --workdir=DIR --seeds=0-4

runs seed s in DIR/seed_<s>/ (each its own resumable workdir: a re-run skips
finished seeds and resumes an interrupted one), then writes

  DIR/aggregate.json   {"seeds", "per_seed": [{seed, metric: value}], "mean", "sd", "n"}
  DIR/aggregate.md     the per-seed table and mean ± sd of every headline metric
  DIR/accuracy.png     greedy / SC accuracy per round, mean with ±1 sd error bars
  DIR/learners.png     (mode "learners") each learner's greedy / SC per round, mean ± sd

A demo claim is a mean ± sd over seeds, and must hold on every seed: the exact
numbers vary with the CPU (XLA:CPU's float order), the claim must not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

from lmsi_jax import fileio
from lmsi_jax.diagnostics import pct

ARMS = ("oracle", "control", "spurious")


def parse_seeds(spec: str) -> list[int]:
  """"0-4" -> [0, 1, 2, 3, 4]; "0,2,5" -> [0, 2, 5]; one line naming the flag when malformed."""
  seeds = []
  for part in str(spec).split(","):
    part = part.strip()
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
      raise ValueError(f"--seeds={spec!r}: expected seeds like '0-4' or '0,1,2', got {part!r}")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    seeds += list(range(lo, hi + 1))
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={spec!r}: a seed is listed twice")
  return seeds


def seed_workdir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def headline(rep: dict) -> dict[str, float | None]:
  """The flat metrics of one report that the aggregate averages."""
  out = {"base_greedy": rep["base"]["greedy_acc"], "base_sc": rep["base"]["sc_acc"]}
  for r in rep["rounds"]:
    out[f"round{r['round']}_greedy"] = r["greedy_acc"]
    out[f"round{r['round']}_sc"] = r["sc_acc"]
    out[f"round{r['round']}_precision"] = r.get("pseudo_label_precision")
  final = rep.get("final") or {}
  out["final_round"] = final.get("round")
  out["final_greedy"] = final.get("greedy_acc")
  out["final_sc"] = final.get("sc_acc")
  for arm in ARMS:
    if rep.get(arm):
      out[f"{arm}_greedy"] = rep[arm]["greedy_acc"]
      out[f"{arm}_sc"] = rep[arm]["sc_acc"]
  for k, v in (rep.get("gains") or {}).items():
    out[f"gain_{k}"] = v
  for name, v in (rep.get("learners") or {}).items():     # mode "learners"
    for r in v["rounds"]:
      for key, col in (("greedy_acc", "greedy"), ("sc_acc", "sc"),
                       ("pseudo_label_precision", "precision"),
                       ("reward_accuracy", "reward_accuracy")):
        if r.get(key) is not None:
          out[f"{name}_round{r['round']}_{col}"] = r[key]
    out[f"{name}_final_greedy"] = v["final"]["greedy_acc"]
    out[f"{name}_final_sc"] = v["final"]["sc_acc"]
    out[f"{name}_sampled_tokens"] = v["sampled_tokens"]
    out[f"{name}_wall_s"] = v["wall_s"]
    if v.get("spurious"):
      out[f"{name}_spurious_greedy"] = v["spurious"]["greedy_acc"]
  out["pgr"] = rep.get("pgr")
  out["pgr_sc"] = rep.get("pgr_sc")
  out["wall_s"] = rep.get("wall_s")
  return out


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
  m = math.fsum(xs) / len(xs)
  if len(xs) < 2:
    return m, None
  return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(reports: dict[int, dict]) -> dict:
  """Per-seed headline rows and, per metric, mean and sample sd (n-1) over the seeds that have it."""
  rows = [{"seed": s, **headline(rep)} for s, rep in sorted(reports.items())]
  keys = [k for k in rows[0] if k != "seed"] if rows else []
  for row in rows[1:]:
    keys += [k for k in row if k not in keys and k != "seed"]
  mean, sd, n = {}, {}, {}
  for k in keys:
    xs = [row[k] for row in rows if row.get(k) is not None]
    if xs:
      mean[k], sd[k] = _mean_sd([float(x) for x in xs])
      n[k] = len(xs)
  return {"seeds": sorted(reports), "per_seed": rows, "mean": mean, "sd": sd, "n": n}


def _fmt(k: str, v) -> str:
  if v is None:
    return "—"
  if k.startswith(("pgr", "final_round")):
    return f"{v:.2f}" if k.startswith("pgr") else f"{v:.0f}"
  if k == "wall_s" or k.endswith(("_wall_s", "_sampled_tokens")):
    return f"{v:.0f}"
  if k.startswith("gain_"):
    return f"{100 * v:+.1f}"
  return pct(v)


def to_markdown(agg: dict) -> str:
  keys = list(agg["mean"])
  lines = [f"# LMSI over {len(agg['seeds'])} seeds", "",
           "Accuracies in %, gains in points, PGR on greedy accuracy; mean ± sd (n − 1) over "
           "seeds.", "", "| metric | " + " | ".join(f"seed {s}" for s in agg["seeds"])
           + " | mean ± sd |", "|---" * (len(agg["seeds"]) + 2) + "|"]
  for k in keys:
    cells = [_fmt(k, row.get(k)) for row in agg["per_seed"]]
    m, sd = agg["mean"][k], agg["sd"][k]
    cells.append(_fmt(k, m) + ("" if sd is None else " ± " + _fmt(k, sd).lstrip("+").rstrip("%")))
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(agg: dict, workdir: str) -> str:
  """accuracy.png: LMSI greedy and SC per round (mean ± sd), arms as bands."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from lmsi_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  mean, sd = agg["mean"], agg["sd"]
  rounds = sorted(int(k[5:-7]) for k in mean if re.fullmatch(r"round\d+_greedy", k))
  xs = [0] + rounds
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for kind, label, style in (("greedy", "LMSI greedy CoT", "o-"), ("sc", "LMSI self-consistency", "s-")):
    keys = [f"base_{kind}"] + [f"round{r}_{kind}" for r in rounds]
    ax.errorbar(xs, [mean[k] for k in keys], yerr=[sd[k] or 0.0 for k in keys], fmt=style,
                capsize=3, label=label)
  for arm, color in (("oracle", "green"), ("control", "red"), ("spurious", "purple")):
    k = f"{arm}_greedy"
    if k in mean:
      ax.axhline(mean[k], color=color, ls="--", label=f"{arm} greedy")
      if sd[k]:
        ax.axhspan(mean[k] - sd[k], mean[k] + sd[k], color=color, alpha=0.08)
  ax.axhline(mean["base_sc"], color="gray", ls=":", label="base SC")
  ax.set(xlabel="round (0 = base)", ylabel="held-out accuracy", ylim=(0, 1),
         title=f"Held-out accuracy, mean ± sd over {len(agg['seeds'])} seeds")
  ax.set_xticks(xs)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return report_lib.save_png(fig, os.path.join(workdir, "accuracy.png"))


def plot_learners(agg: dict, workdir: str) -> str | None:
  """learners.png (mode "learners"): each learner's greedy and SC accuracy per round from the
  shared base, mean ± sd over the seeds, side by side; None without learners."""
  mean, sd = agg["mean"], agg["sd"]
  names = list(dict.fromkeys(m.group(1) for k in mean
                             if (m := re.fullmatch(r"(\w+?)_round\d+_greedy", k))))
  if not names:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from lmsi_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, kind, title in zip(axes, ("greedy", "sc"), ("greedy CoT", "self-consistency")):
    for name in names:
      rounds = sorted(int(m.group(1)) for k in mean
                      if (m := re.fullmatch(rf"{name}_round(\d+)_{kind}", k)))
      keys = [f"base_{kind}"] + [f"{name}_round{r}_{kind}" for r in rounds]
      ax.errorbar([0] + rounds, [mean[k] for k in keys], yerr=[sd[k] or 0.0 for k in keys],
                  fmt="o-", capsize=3, label=name)
      ax.set_xticks([0] + rounds)
    ax.set(xlabel="round (0 = base)", ylabel="held-out accuracy", ylim=(0, 1),
           title=f"{title}, mean ± sd over {len(agg['seeds'])} seeds")
    ax.legend(fontsize=8)
  fig.tight_layout()
  return report_lib.save_png(fig, os.path.join(workdir, "learners.png"))


def write(agg: dict, workdir: str) -> None:
  fileio.write_text_atomic(os.path.join(workdir, "aggregate.json"),
                           json.dumps(agg, indent=1, sort_keys=True))
  fileio.write_text_atomic(os.path.join(workdir, "aggregate.md"), to_markdown(agg))
  plot(agg, workdir)
  plot_learners(agg, workdir)


def run_seeds(cfg, workdir: str, seeds: list[int]) -> dict:
  """Runs (or resumes) `cfg` once per seed in its own workdir; writes and returns the aggregate."""
  from lmsi_jax import distributed  # pylint: disable=g-import-not-at-top
  from lmsi_jax import modes  # pylint: disable=g-import-not-at-top
  reports = {}
  for i, s in enumerate(seeds):
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
      c.seed = s
    logging.info("seed %d (%d of %d): %s", s, i + 1, len(seeds), seed_workdir(workdir, s))
    reports[s] = modes.build(c, seed_workdir(workdir, s)).run()
  agg = aggregate(reports)
  if distributed.is_main_process():
    write(agg, workdir)
  return agg
