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


def _extraction(unextracted, strict_disagree, **kw):
  return {"extractor": "lmsi", "greedy_unextracted": unextracted, "greedy_paths": 10,
          "sc_unextracted": 2 * unextracted, "sc_paths": 40,
          "greedy_others": {"lm_eval_strict": {"acc": 0.3, "unextracted": 4,
                                               "disagree": strict_disagree},
                            "boxed": {"acc": 0.5, "unextracted": 0, "disagree": 1}},
          "unavailable": ["math_verify"], **kw}


def test_extraction_table_and_json():
  class Cfg:
    def to_json(self):
      return "{}"
  base = {"greedy_acc": 0.4, "sc_acc": 0.5, "calibration": [], "wall_s": 1.0,
          "examples": [], "extraction": _extraction(3, 2)}
  oracle = {**base, "extraction": _extraction(0, 1)}
  rounds = [_row(1, extraction=_extraction(1, 0))]
  rep = report.build_report(Cfg(), base, rounds, oracle, None, wall_s=3.0,
                            wall_s_this_invocation=3.0)
  assert rep["base"]["extraction"] == _extraction(3, 2) and "examples" not in rep["base"]
  assert rep["oracle"]["extraction"]["greedy_unextracted"] == 0
  md = report.to_markdown(rep)
  assert "Answer extraction (task.extractor = lmsi)" in md
  assert "| model | greedy unextracted | SC paths unextracted | lm_eval_strict | boxed |" in md
  assert "| base | 3/10 | 6/40 | 2 (30.0%) | 1 (50.0%) |" in md
  assert "| LMSI round 1 | 1/10 | 2/40 | 0 (30.0%) | 1 (50.0%) |" in md
  assert "| oracle | 0/10 | 0/40 | 1 (30.0%) | 1 (50.0%) |" in md
  assert "Not compared (package not installed): math_verify." in md
  # reports written before extractors existed have no table
  assert "Answer extraction" not in report.to_markdown(_rep([_row(1)]))
