"""Self-generated questions and exemplars (LMSI §3.3): filters, prompts, files, resume."""
import json
import os

import numpy as np
import pytest

from lmsi_jax import formats as formats_lib
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import selfgen
from lmsi_jax import testing
from lmsi_jax.data import jsonl

S = pl.VoteSettings()



def _rec(qid, answers):
  return {"id": qid, "samples": [{"text": f"x. The answer is {a}." if a else "no idea"}
                                 for a in answers]}


def test_candidates_duplicates_of_existing_questions_are_dropped():
  existing = ["1+2+3", "4+5+6+7+8"]
  out = selfgen.mark_candidates(
      [" 4+5+6+7+8\nA: 4+5=9", "9+9+1", "1+2+3", "", "  \n", "9+9+1", " 4 + 5", "4 +  5"],
      existing)
  assert [c["status"] for c in out] == ["duplicate", "new", "duplicate", "empty", "empty",
                                        "duplicate", "new", "duplicate"]
  assert out[0]["question"] == "4+5+6+7+8" and out[6]["question"] == "4 + 5"


def test_vote_share_threshold_one_keeps_only_unanimous_questions():
  recs = [_rec("a", ["5"] * 4), _rec("b", ["5", "5", "5", "6"]), _rec("c", [None] * 4),
          _rec("d", ["7", "7", "7", None])]
  keep = lambda t: [v["id"] for v in selfgen.confident_questions(recs, S, t) if v["keep"]]
  assert keep(1.0) == ["a"]
  assert keep(0.75) == ["a", "b", "d"]
  assert keep(0.0) == ["a", "b", "d"]       # no parseable answer is never kept
  v = selfgen.confident_questions(recs, S, 1.0)
  assert (v[1]["answer"], v[1]["share"]) == ("5", 0.75)


def test_question_prompt_is_randomly_ordered_seed_questions():
  seeds = [f"{i}+{i}" for i in range(1, 9)]
  rng = np.random.default_rng(0)
  prompts = [selfgen.question_prompt(seeds, rng, 3) for _ in range(20)]
  for p in prompts:
    lines = p.split("\n")
    assert lines[-1] == "Q:" and len(lines) == 4
    qs = [l[len("Q: "):] for l in lines[:-1]]
    assert len(set(qs)) == 3 and set(qs) <= set(seeds)
  assert len(set(prompts)) > 10                      # orders and picks vary
  assert selfgen.question_prompt(seeds[:2], rng, 5).count("Q: ") == 2


def test_exemplar_pairs_layout():
  texts = [" 1+2=3, 3+4=7. The answer is 7.\nmore text", "no answer here",
           " 2+2=4. The answer is 4.\nQ: 9+9", " 5+5=10. The answer is 10."]
  pairs = selfgen.exemplar_pairs(["1+2+4", "3+3", "2+2", "5+5"], texts, S, n=2)
  assert pairs == [("1+2+4", "1+2=3, 3+4=7. The answer is 7.", "7"),
                   ("2+2", "2+2=4. The answer is 4.", "4")]


# --------------------------------------------------------- through a Pipeline
@pytest.fixture(scope="module")
def pipe(tmp_path_factory, demo_config):
  from lmsi_jax import rounds
  cfg = demo_config("smoke")
  cfg.selfgen.update(questions=True, num_questions=7, prompt_questions=3, seed_questions=5,
                     min_vote_share=1.0, exemplars=True, num_exemplars=2)
  cfg.sampling.update(num_samples=4)
  return rounds.Pipeline(cfg, str(tmp_path_factory.mktemp("selfgen")))


class ScriptedGenerate:
  """A script for testing.ScriptedSampler: answers by prompt kind, records every call."""

  def __init__(self, question_texts, answers_by_question, greedy_by_question=None):
    self.question_texts, self.answers = question_texts, answers_by_question
    self.greedy, self.calls = greedy_by_question or {}, []

  def __call__(self, prompts, settings, seed):
    del seed
    num_samples, temperature = settings.num_samples, settings.temperature
    self.calls.append(dict(prompts=list(prompts), num_samples=num_samples,
                           temperature=temperature, stop_strings=settings.stop_strings))
    out = []
    for i, p in enumerate(prompts):
      if p.endswith("\nQ:"):                                   # a question-writing prompt
        texts = [self.question_texts[i]]
      elif temperature == 0.0:                                 # greedy exemplar answers
        q = p[len("Q: "):p.index("\nA:")]
        texts = [self.greedy[q]]
      else:                                                    # SC samples of a candidate
        q = p[len("Q: "):p.index("\nA:")]
        texts = [f" {a}. The answer is {a}." for a in self.answers[q]][:num_samples]
      out.append(texts)
    return out


def _with(pipe, script):
  """The pipeline's context sampling through `script` (injected: nothing is patched)."""
  return pipe.ctx.replace(sampler=testing.ScriptedSampler(script))


def test_generated_questions_stage(pipe):
  pool, evals = pipe.problem.pool, pipe.problem.eval
  gen = ScriptedGenerate(
      [" 1+1+1+1+1\nA: 1+1=2", " " + pool[0]["question"], evals[1]["question"], "",
       " 2+2+2+2+2", " 1+1+1+1+1", " " + "1+" * 300 + "1"],
      {"1+1+1+1+1": ["5"] * 4, "2+2+2+2+2": ["10", "10", "10", "11"]})
  kept, summary = selfgen.generate_questions(_with(pipe, gen), pipe.base_lm, 1)
  # write prompts: 3 seed questions from the first 5 pool questions, at sampling temperature
  first = gen.calls[0]
  assert len(first["prompts"]) == 7 and first["stop_strings"] == ("\n",)
  assert first["temperature"] == pipe.cfg.sampling.temperature
  seeds = {q["question"] for q in pool[:5]}
  for p in first["prompts"]:
    assert {l[3:] for l in p.split("\n")[:-1]} <= seeds and p.count("Q: ") == 3
  # only the two new candidates are answered, with the round's prompt
  assert gen.calls[1]["prompts"] == pipe.prompts([{"question": "1+1+1+1+1"},
                                                   {"question": "2+2+2+2+2"}])
  assert [q["question"] for q in kept] == ["1+1+1+1+1"]       # 3/4 share < 1.0
  assert kept[0]["answer"] == "5" and kept[0]["id"] == "gen1-0"   # diagnostic gold only
  assert summary == {**summary, "num_candidates": 7, "num_empty": 1, "num_duplicates": 3,
                     "num_too_long": 1, "num_new": 2, "num_kept": 1, "kept_precision": 1.0}
  d = os.path.join(pipe.workdir, "round_1", "selfgen")
  assert jsonl.read_jsonl(os.path.join(d, "questions.jsonl")) == kept
  assert len(jsonl.read_jsonl(os.path.join(d, "candidates.jsonl"))) == 7
  # a re-run reads the files and generates nothing
  again = _with(pipe, lambda *a: pytest.fail("generated again"))
  assert selfgen.generate_questions(again, pipe.base_lm, 1) == (kept, summary)


def test_generated_exemplars_are_greedy_zero_shot_cot_answers(pipe):
  greedy = {q["question"]: f" {q['question']}=x. The answer is {i}." if i % 3 else " no idea"
            for i, q in enumerate(pipe.problem.pool)}
  gen = ScriptedGenerate([], {}, greedy)
  ex = selfgen.generate_exemplars(_with(pipe, gen), pipe.base_lm)
  (call,) = gen.calls
  assert call["temperature"] == 0.0 and call["num_samples"] == 1
  qs = [p[len("Q: "):p.index("\nA:")] for p in call["prompts"]]
  assert call["prompts"] == [f"Q: {q}\nA: Let's think step by step." for q in qs]
  assert len(qs) == 2 * selfgen.EXEMPLAR_TRIES and set(qs) <= set(greedy)
  answered = [q for q in qs if greedy[q] != " no idea"][:2]
  assert len(answered) == 2
  want = formats_lib.exemplars_from_pairs(
      [(q, greedy[q].strip(), greedy[q].split()[-1].rstrip(".")) for q in answered])
  assert ex == want
  assert ex.cot.startswith(f"Q: {answered[0]}\nA: {answered[0]}=x. The answer is")
  with open(os.path.join(pipe.workdir, "selfgen", "exemplars.json")) as f:
    assert json.load(f)["cot"] == ex.cot
  # few-shot inputs now use them
  assert formats_lib.build_input("few_shot_cot", "1+2", ex).startswith(ex.cot + "\n\n")
