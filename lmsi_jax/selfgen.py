"""Self-generated data (LMSI §3.3): new questions and few-shot exemplars from the model.

Questions (`selfgen.questions`): each round, before sampling, the round's
starting model sees `prompt_questions` real pool questions (drawn from the
first `seed_questions` of the pool) in random order,

  Q: {q_a}
  Q: {q_b}
  Q:

and continues with a new question (up to the end of the line), once per
prompt, `num_questions` prompts. A candidate is dropped when it is empty or
duplicates an existing question (seed, pool or eval set, or an earlier
candidate; compared after whitespace normalisation, so no eval question can
enter training), or when its prompt plus the decode budget would not fit the
model's context. The rest are answered by self-consistency with the round's
prompt and sampling settings, and a candidate is kept only when the vote share
of its majority answer is >= `min_vote_share` (1.0 keeps unanimous ones only).
Kept questions join the round's unlabeled pool and go through the same
sample → vote → formats stages. Gold is never consulted: for the synthetic task
the sum of a well-formed generated question is recorded as a diagnostic gold
(pseudo-label precision of the kept questions), nothing more.

Exemplars (`selfgen.exemplars`): the base model answers `num_exemplars` pool
questions (a seeded random order; up to 4x as many are tried) greedily with the
zero-shot CoT prompt "Q: {q}\\nA: Let's think step by step."; every answer
with a parseable final answer becomes a CoT exemplar "Q: {q}\\nA: {answer text
up to the end of its answer line}" and a standard exemplar "Q: {q}\\nA: The
answer is {a}." (the layout of `formats.exemplars_from_pairs`). They replace the
task's exemplars for every prompt and pseudo-label format after stage 0 (the
seed data keeps the task's own exemplars: stage 0 trains on it before the model
can write any).

Files (atomic; a re-run reads them instead of generating again):
  DIR/selfgen/exemplars.json                   pairs, cot and standard blocks
  DIR/round_<r>/selfgen/candidates.jsonl       every generated text and its fate
  DIR/round_<r>/selfgen/samples/shard_*.jsonl  SC samples of the new candidates
  DIR/round_<r>/selfgen/questions.jsonl        kept questions (the pool addition)
  DIR/round_<r>/selfgen/summary.json           counts, diagnostic precision, wall time
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from lmsi_jax import context as context_lib
from lmsi_jax import distributed
from lmsi_jax import fileio
from lmsi_jax import formats as formats_lib
from lmsi_jax import problems
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import seeds
from lmsi_jax import voting
from lmsi_jax.data import jsonl
from lmsi_jax.data import synthetic

EXEMPLAR_TRIES = 4     # greedy answers tried per wanted exemplar


def _norm(question: str) -> str:
  return " ".join(question.split())


# ----------------------------------------------------------------- questions
def question_prompt(seed_questions: Sequence[str], rng: np.random.Generator, k: int) -> str:
  """`k` distinct seed questions in random order, then "Q:" for the model to continue."""
  idx = rng.choice(len(seed_questions), size=min(k, len(seed_questions)), replace=False)
  return "\n".join(formats_lib.question_line(seed_questions[i]) for i in idx) + "\nQ:"


def mark_candidates(texts: Sequence[str], existing: Sequence[str]) -> list[dict]:
  """Each generated text's first line, with status "empty", "duplicate" or "new"."""
  seen = {_norm(q) for q in existing}
  out = []
  for text in texts:
    q = text.split("\n", 1)[0].strip()
    status = "empty" if not q else "duplicate" if _norm(q) in seen else "new"
    seen.add(_norm(q))
    out.append({"question": q, "status": status})
  return out


def confident_questions(sample_records: Sequence[dict], s: pl.VoteSettings,
                        min_vote_share: float) -> list[dict]:
  """Per candidate: its SC vote and whether its share passes `min_vote_share`."""
  out = []
  for rec in sample_records:
    texts = [x["text"] for x in rec["samples"]]
    vote, _, _ = voting.vote_question(texts, s.answer_type, s.cue, stop=s.stop or None,
                                      fallback_last_number=s.fallback_last_number,
                                      extractor=s.extractor)
    keep = vote.answer is not None and vote.share + 1e-12 >= min_vote_share
    out.append({"id": rec["id"], "answer": vote.answer, "share": vote.share, "keep": keep})
  return out


def _fits(ctx, lm, question: str) -> bool:
  """Whether the question's sampling prompt plus the decode budget fits the model context."""
  n = problems.prompt_tokens(ctx.problem, ctx.vocab, ctx.cfg.prompt_format, question)
  return n + ctx.sampling.max_decode_steps <= lm.cfg.max_seq_len


def diagnostic_gold(problem_name: str, question: str) -> str | None:
  """The true answer where the task can compute it (synthetic sums); else None."""
  if problem_name != "synthetic":
    return None
  try:
    return synthetic.answer_of(synthetic.parse_question(question))
  except ValueError:
    return None


def generate_questions(ctx, lm, r: int) -> tuple[list[dict], dict]:
  """Round r's kept self-generated questions (pool records) and the stage summary.

  `ctx`: the run's context.RunContext (it samples with `ctx.sampler`)."""
  from lmsi_jax import stages  # pylint: disable=g-import-not-at-top
  p, g, c = ctx, ctx.cfg.selfgen, ctx.cfg
  d = p.path(f"round_{r}", "selfgen")
  q_path, sum_path = os.path.join(d, "questions.jsonl"), os.path.join(d, "summary.json")
  cand_path = os.path.join(d, "candidates.jsonl")
  st = p.stage(d, context_lib.SELFGEN_QUESTION_KEYS, exclude=("selfgen.exemplars", "selfgen.num_exemplars"),
               inputs=[p.origin(lm), p.exemplar_stage()], extra={"round": r})
  if st.done:
    return jsonl.read_jsonl(q_path), fileio.read_json(sum_path)
  st.begin(d)
  if distributed.agreed_exists(cand_path):    # a killed run of this same stage wrote them
    cands = jsonl.read_jsonl(cand_path)
  else:
    rng = seeds.rng(c.seed, "selfgen_prompts", r)
    seed_qs = [q["question"] for q in p.problem.pool[:g.seed_questions]]
    prompts = [question_prompt(seed_qs, rng, g.prompt_questions) for _ in range(g.num_questions)]
    s = p.sampling.replace(num_samples=1, max_decode_steps=g.max_question_tokens,
                           stop_strings=("\n",))
    out = p.sampler_for(lm).generate(prompts, s, seed=seeds.stream(c.seed, "selfgen_questions", r))
    existing = [q["question"] for q in p.problem.seed + p.problem.pool + p.problem.eval]
    cands = mark_candidates([row[0].text for row in out], existing)
    for i, cand in enumerate(cands):
      cand.update(id=f"gen{r}-{i}", answer=diagnostic_gold(p.problem.name, cand["question"]))
      if cand["status"] == "new" and not _fits(p, lm, cand["question"]):
        cand["status"] = "too_long"
    if distributed.is_main_process():
      jsonl.write_jsonl_atomic(cand_path, cands)
  new = [{"id": x["id"], "question": x["question"], "answer": x["answer"], "cot": None}
         for x in cands if x["status"] == "new"]
  samples = stages.sample(p, lm, new, os.path.join(d, "samples"), seeds.stream(c.seed, "selfgen_samples", r))
  votes = confident_questions(samples, p.vote_settings, g.min_vote_share)
  kept = [q for q, v in zip(new, votes) if v["keep"]]
  scored = [v["answer"] == q["answer"] for q, v in zip(new, votes)
            if v["keep"] and q["answer"] is not None]
  summary = {"num_candidates": len(cands),
             "num_empty": sum(x["status"] == "empty" for x in cands),
             "num_duplicates": sum(x["status"] == "duplicate" for x in cands),
             "num_too_long": sum(x["status"] == "too_long" for x in cands),
             "num_new": len(new), "num_kept": len(kept),
             "mean_vote_share": float(np.mean([v["share"] for v in votes])) if votes else None,
             "kept_precision": float(np.mean(scored)) if scored else None,
             "wall_s": st.elapsed()}
  logging.info("round %d: self-generated %d questions, %d new, %d kept (vote share >= %.2f)",
               r, len(cands), len(new), len(kept), g.min_vote_share)
  if distributed.is_main_process():
    jsonl.write_jsonl_atomic(q_path, kept)
  distributed.write_json(sum_path, summary)
  st.finish(cand_path, q_path, sum_path, wall_s=summary["wall_s"])
  return kept, summary


# ----------------------------------------------------------------- exemplars
def exemplar_pairs(questions: Sequence[str], texts: Sequence[str], s: pl.VoteSettings,
                   n: int) -> list[tuple[str, str, str]]:
  """(question, path, answer) for the first `n` texts with a parseable answer.

  The path is the text truncated at the stop string and after the line that
  holds the answer cue, so an exemplar ends with its answer sentence.
  """
  pairs = []
  for q, text in zip(questions, texts):
    path = voting.truncate_at_stop(text, s.stop or None)
    answer = voting.extract_answer(path, s.answer_type, s.cue, None, False)
    if answer is None:
      continue
    i = path.lower().find(s.cue.lower())
    end = path.find("\n", i)
    pairs.append((q, (path if end < 0 else path[:end]).strip(), answer))
    if len(pairs) == n:
      break
  return pairs


def generate_exemplars(ctx, lm) -> formats_lib.Exemplars:
  """The model's greedy zero-shot CoT answers as few-shot exemplars (cached on disk)."""
  p = ctx
  path = p.path("selfgen", "exemplars.json")
  st = p.stage(path, context_lib.SELFGEN_EXEMPLAR_KEYS, inputs=[p.origin(lm)])
  if st.done:
    d = fileio.read_json(path)
    return formats_lib.Exemplars(d["cot"], d["standard"])
  st.begin(path)
  c, n = p.cfg, p.cfg.selfgen.num_exemplars
  order = seeds.rng(c.seed, "selfgen_exemplars").permutation(len(p.problem.pool))
  qs = [p.problem.pool[i]["question"] for i in order[:EXEMPLAR_TRIES * n]]
  prompts = [formats_lib.build_input("zero_shot_cot", q) for q in qs]
  out = p.sampler_for(lm).generate(
      prompts, p.sampling.greedy().replace(top_k=0, top_p=1.0), seed=c.seed)
  pairs = exemplar_pairs(qs, [row[0].text for row in out], p.vote_settings, n)
  if not pairs:
    raise ValueError(f"config.selfgen.exemplars=True: none of {len(qs)} greedy zero-shot CoT "
                     "answers of the base model has a parseable final answer")
  if len(pairs) < n:
    logging.warning("selfgen: only %d of %d greedy answers parse; using %d exemplars",
                    len(pairs), len(qs), len(pairs))
  ex = formats_lib.exemplars_from_pairs(pairs)
  distributed.write_json(path, {"pairs": [list(x) for x in pairs], "cot": ex.cot, "standard": ex.standard,
                     "tried": len(qs), "wall_s": st.elapsed()})
  st.finish(path)
  return ex
