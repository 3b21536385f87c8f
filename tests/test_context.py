"""Settings objects built from the config, typed results, the Sampler seam and its fake."""
import dataclasses
import os

import pytest

from lmsi_jax import generation
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import results
from lmsi_jax import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampling_settings_carry_every_knob_from_the_config(demo_config):
  c = demo_config("smoke")
  s = generation.SamplingSettings.from_config(c)
  assert s == generation.SamplingSettings(
      num_samples=c.sampling.num_samples, temperature=c.sampling.temperature,
      top_k=c.sampling.top_k, top_p=c.sampling.top_p,
      max_decode_steps=c.sampling.max_decode_steps, stop_strings=(c.task.stop,),
      batch_size=c.sampling.batch_size)
  g = s.greedy()
  assert (g.num_samples, g.temperature, g.top_k) == (1, 0.0, s.top_k)
  assert generation.SamplingSettings(stop_strings=("", "\n")).stop_strings == ("\n",)


@pytest.mark.parametrize("kw,msg", [
    ({"num_samples": 0}, "sampling num_samples must be an int >= 1, got 0"),
    ({"temperature": -1.0}, "sampling temperature must be >= 0"),
    ({"top_p": 0.0}, "sampling top_p must be in (0, 1]"),
    ({"top_k": 1.5}, "sampling top_k must be an int >= 0"),
    ({"batch_size": 0}, "sampling batch_size must be an int >= 1"),
])
def test_sampling_settings_validate_when_built(kw, msg):
  with pytest.raises(ValueError) as e:
    generation.SamplingSettings(**kw)
  assert msg in str(e.value)


def test_eval_and_vote_settings_from_config_by_keyword(demo_config):
  from lmsi_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  c = demo_config("smoke")
  e, t = c.eval, c.task
  assert eval_lib.EvalSettings.from_config(c, 0.5) == eval_lib.EvalSettings(   # the old call
      c.prompt_format, e.num_samples, 0.5, e.top_k, e.top_p, e.max_decode_steps,
      e.calibration_bins, c.sampling.batch_size, t.answer_type, t.cue, t.stop,
      c.voting.fallback_last_number, t.extractor)
  v = c.voting
  assert pl.VoteSettings.from_config(c) == pl.VoteSettings(
      t.answer_type, t.cue, t.stop, v.min_vote_share, v.max_paths, v.dedup, v.weighted,
      v.fallback_last_number, t.extractor)
  with pytest.raises(ValueError, match="sampling top_p"):
    eval_lib.EvalSettings("few_shot_cot", top_p=2.0)


def test_results_serialise_to_the_report_keys():
  ev = results.EvalResult(greedy_acc=0.5, sc_acc=0.75, num_questions=4, sc_num_samples=3,
                          sc_temperature=1.0, mean_vote_share=0.6, greedy_parse_rate=1.0,
                          calibration=[], extraction=None, examples=[], wall_s=2.0)
  assert results.EvalResult.from_dict(ev.to_dict()) == ev and ev["sc_acc"] == 0.75
  with pytest.raises(TypeError):
    results.EvalResult.from_dict({**ev.to_dict(), "greedy_accuracy": 0.5})   # a misspelt key
  vs = results.VoteSummary(num_questions=4, num_voted=3, num_pseudo_labels=5,
                           mean_vote_share=0.5, mean_distinct_answers=1.5, mean_distinct_paths=2.0,
                           pseudo_label_precision=1.0, pass_at_k=1.0, maj_at_k=0.75,
                           pool_calibration=None, num_records=10, sample_wall_s=1.0,
                           vote_wall_s=0.5)
  row = results.RoundResult.of(1, vs, ev, {"wall_s": 3.0, "num_truncated": 2}, {})
  d = row.to_dict()
  assert "selfgen" not in d and "guard" not in d
  assert d["wall_s"] == 1.0 + 0.5 + 3.0 + 2.0 and d["train_truncated"] == 2
  assert dataclasses.replace(row, guard={"flagged": False}).to_dict()["guard"] == {
      "flagged": False}


def test_scripted_sampler_records_calls_and_follows_the_model():
  fake = testing.ScriptedSampler(lambda prompts, s, seed: [[f"{p}/{seed}"] * s.num_samples
                                                           for p in prompts])
  s = generation.SamplingSettings(num_samples=2)
  rows = fake.for_model("lm1").generate(["a", "b"], s, seed=7)
  assert [[x.text for x in r] for r in rows] == [["a/7", "a/7"], ["b/7", "b/7"]]
  (call,) = fake.calls
  assert call.prompts == ["a", "b"] and call.settings == s and call.lm == "lm1"


def test_report_takes_sections_and_imports_no_runner():
  src = open(os.path.join(REPO, "lmsi_jax", "report.py")).read()
  assert "import w2s" not in src and "import ablation" not in src
