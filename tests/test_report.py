"""report.md / diagnostics.png: per-round pool diagnostics, self-generated questions, early stop."""
import os

from lmsi_jax import report


def _row(r, **kw):
  row = {"round": r, "greedy_acc": 0.5, "sc_acc": 0.6, "num_questions": 10,
         "num_pseudo_labels": 40 + r, "pseudo_label_precision": 0.8, "mean_vote_share": 0.7,
         "pass_at_k": 0.9, "maj_at_k": 0.75, "mean_distinct_answers": 2.5,
         "mean_distinct_paths": 3.25, "calibration": [], "wall_s": 1.0}
  return {**row, **kw}


def _rep(rounds, **kw):
  base = {"greedy_acc": 0.4, "sc_acc": 0.5, "calibration": [], "wall_s": 1.0}
  return {"base": base, "rounds": rounds, "oracle": None, "control": None, "pgr": None,
          "pgr_sc": None, "calibration": [], "base_calibration": [], "wall_s": 3.0,
          "early_stop": None, **kw}


def test_diagnostics_table_and_plot(tmp_path):
  rep = _rep([_row(1), _row(2, pass_at_k=0.95, maj_at_k=0.8, pseudo_label_precision=None,
                           selfgen={"num_candidates": 8, "num_empty": 1, "num_duplicates": 2,
                                    "num_too_long": 1, "num_new": 4, "num_kept": 3, "kept_precision": 2 / 3})],
             early_stop={"patience": 1, "stopped_after_round": 2, "best_round": 1,
                         "best_greedy_acc": 0.5, "reason": "greedy accuracy did not improve"})
  md = report.to_markdown(rep)
  assert "| 1 | 90.0% | 75.0% | 80.0% | 70.0% | 2.50 | 3.25 | 41 |" in md
  assert "| 2 | 95.0% | 80.0% | — | 70.0% | 2.50 | 3.25 | 42 |" in md
  assert "| 2 | 8 | 1 | 2 | 1 | 4 | 3 | 66.7% |" in md
  assert "stopped after round 2: greedy accuracy did not improve" in md
  report.write_report(rep, str(tmp_path))
  assert os.path.getsize(tmp_path / "diagnostics.png") > 10_000
  assert "Self-generated" not in report.to_markdown(_rep([_row(1)]))
  assert "Early stopping" not in report.to_markdown(_rep([_row(1)]))
