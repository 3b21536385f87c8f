"""Learner `vote_rl` (TTRL-style): on-policy GRPO with the majority vote as the reward.

One round = `vote_rl.steps_per_round` batches. Each batch: `questions_per_step`
pool questions (a seeded permutation of the round's pool, wrapping) are sampled
`samples_per_question` times with the CURRENT weights (the sampler reads the
train step's own sharded params: no copy, no second engine); each question's
paths are voted, a path's reward is 1 if its answer is the majority
(`objectives.vote_rewards`, which sees sampled answers only; the plain count
majority, answers read with the task's extractor: voting.weighted,
min_vote_share, max_paths and dedup shape the sft learner only); advantages are
group-normalised (`std_normalize=False`: Dr. GRPO); then `updates_per_batch`
clipped policy-gradient updates (`objectives.ClippedPolicyGradient`) use the
sampler's own per-token log-probs as the old policy (optional k3 KL to the
frozen base, `kl_coef`). The optimizer and schedule are the train.* recipe
(`vote_rl.learning_rate` overrides the rate; 0 = train.learning_rate).

Its vote store is its own: DIR/round_<r>/train/rollouts/batch_<k>.jsonl holds
every batch's questions, sampled answers, vote, rewards and token counts; the
gold-scored diagnostics (label accuracy = the vote is right; reward accuracy =
a path's vote reward equals its gold reward) are added to those records after
the batch was built, and DIR/round_<r>/vote_summary.json summarises the round
as votes.jsonl does for the other learners.

Resume: a checkpoint (params, optimizer state, batch index) is written at batch
boundaries every `train.checkpoint_every` updates and at the end; a killed run
restarts from the last one and re-samples the next batch with the same keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from lmsi_jax import checkpoint as ckpt_lib
from lmsi_jax import distributed
from lmsi_jax import fileio
from lmsi_jax import preemption
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import results
from lmsi_jax import seeds
from lmsi_jax import train as train_lib
from lmsi_jax import voting
from lmsi_jax.context import TRAIN_KEYS, RunContext, ids_hash
from lmsi_jax.data import jsonl
from lmsi_jax.data import vocab as vocab_lib
from lmsi_jax.learners import objectives
from lmsi_jax.learners import rows as rows_lib

KEYS = TRAIN_KEYS + ("rounds.learner", "rounds.init", "vote_rl", "sampling", "task", "voting",
                     "prompt_format")


@dataclasses.dataclass(frozen=True)
class RlSettings:
  questions_per_step: int = 8
  samples_per_question: int = 8
  steps_per_round: int = 4
  updates_per_batch: int = 1
  clip_eps: float = 0.2
  std_normalize: bool = True
  kl_coef: float = 0.0
  learning_rate: float = 0.0        # 0 = train.learning_rate

  def __post_init__(self):
    for k in ("questions_per_step", "samples_per_question", "steps_per_round",
              "updates_per_batch"):
      v = getattr(self, k)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"vote_rl.{k}={v!r}: must be an int >= 1")
    for k in ("clip_eps", "kl_coef", "learning_rate"):
      if not getattr(self, k) >= 0:
        raise ValueError(f"vote_rl.{k}={getattr(self, k)!r}: must be >= 0")

  @classmethod
  def from_config(cls, cfg) -> "RlSettings":
    return cls(**dict(cfg.vote_rl))

  @property
  def batch_rows(self) -> int:
    return self.questions_per_step * self.samples_per_question


def answers_of(texts, s: pl.VoteSettings) -> list[str | None]:
  """Each path's normalised answer, as the vote of every other learner reads it."""
  _, _, answers = voting.vote_question(
      texts, s.answer_type, s.cue, stop=s.stop or None,
      fallback_last_number=s.fallback_last_number, extractor=s.extractor)
  return answers


def rollout(sampler, vocab, questions, prompts, sampling, vote_settings, *, seed: int,
            std_normalize: bool, seq_len: int):
  """Samples, votes and builds one batch. Returns (rows, records, truncated); reads
  `q["id"]` and `q["question"]` of each question and nothing else (no gold)."""
  out = sampler.generate(prompts, sampling, seed=seed)
  prompt_ids = [vocab_lib.encode_prompt(vocab, p) for p in prompts]
  recs, rewards = [], []
  for q, row in zip(questions, out):
    texts = [x.text for x in row]
    answers = answers_of(texts, vote_settings)
    majority, r = objectives.vote_rewards(answers)
    count = sum(a == majority for a in answers) if majority is not None else 0
    recs.append({"id": q["id"], "answer": majority, "count": count,
                 "share": count / len(answers), "total": len(answers),
                 "kept": int(sum(r)), "distinct_answers": len({a for a in answers if a}),
                 "distinct_paths": len({" ".join(t.split()) for t in texts}),
                 "answers": answers, "rewards": r,
                 "sampled_tokens": int(sum(len(x.tokens) for x in row))})
    rewards.append(r)
  adv = objectives.group_advantages(np.asarray(rewards), std_normalize=std_normalize)
  ps = [prompt_ids[i] for i, row in enumerate(out) for _ in row]
  comps = [list(x.tokens) for row in out for x in row]
  rows, cut = rows_lib.build(ps, comps, seq_len)
  rows["old_logprobs"] = rows_lib.place(ps, [list(x.logprobs) for row in out for x in row],
                                        seq_len)
  rows["advantages"] = adv.reshape(-1)
  return rows, recs, cut


def score(records, questions, answer_type: str) -> list[dict]:
  """Gold diagnostics of rollout records (after the batch was built; never a reward)."""
  gold = {q["id"]: q.get("answer") for q in questions}
  out = []
  for rec in records:
    g = voting.normalize_answer(gold.get(rec["id"]), answer_type) if gold.get(rec["id"]) else None
    extra = {"correct": None, "pass_at_k": None, "reward_accuracy": None}
    if g is not None:
      true_r = [float(a == g) for a in rec["answers"]]
      extra = {"correct": rec["answer"] == g, "pass_at_k": g in rec["answers"],
               "reward_accuracy": float(np.mean([a == b for a, b in zip(rec["rewards"], true_r)]))}
    out.append({**rec, **extra})
  return out


def _order(ctx: RunContext, r: int, n: int, s: RlSettings, k: int) -> np.ndarray:
  perm = seeds.rng(ctx.cfg.seed, "vote_rl_order", r).permutation(n)
  idx = np.arange(k * s.questions_per_step, (k + 1) * s.questions_per_step) % n
  return perm[idx]


def train_round(ctx: RunContext, lm, ref_lm, r: int, questions,
                out_dir: str) -> tuple[object, results.VoteSummary]:
  """Round r of vote_rl from `lm` (see the module docstring): (new lm, round summary)."""
  s = RlSettings.from_config(ctx.cfg)
  if getattr(lm, "frozen", None) is not None or ctx.cfg.train.lora.rank:
    raise ValueError("config.rounds.learner='vote_rl' trains every weight: set train.lora.rank=0")
  if jax.process_count() > 1:   # its batches are built whole on every host (not yet split)
    raise ValueError("config.rounds.learner='vote_rl' runs in one process only (for now)")
  rdir = os.path.dirname(out_dir)
  summary_path = os.path.join(rdir, "vote_summary.json")
  st = ctx.stage(out_dir, KEYS, inputs=[ctx.origin(lm), ctx.exemplar_stage()],
                 extra={"round": r, "questions": ids_hash(questions)})
  if not st.done:
    st.begin(out_dir, summary_path)
  c = ctx.cfg
  total = s.steps_per_round * s.updates_per_batch
  plens = [len(vocab_lib.encode_prompt(ctx.vocab, p)) for p in ctx.prompts(questions)]
  seq_len = min(rows_lib.row_length(plens, c.sampling.max_decode_steps), lm.cfg.max_seq_len)
  tcfg = dataclasses.replace(ctx.train_config(), num_steps=total, batch_size=s.batch_rows,
                             seq_len=seq_len, learning_rate=s.learning_rate or c.train.learning_rate)
  loss = objectives.ClippedPolicyGradient(s.clip_eps, s.kl_coef, ctx.vocab.vocab_size)
  step_fn = train_lib.make_train_step(lm, tcfg, loss)
  sampling = ctx.sampling.replace(num_samples=s.samples_per_question)
  roll_dir = os.path.join(out_dir, "rollouts")
  meta = {"config": c.to_json(), "model_config": dataclasses.asdict(lm.cfg),
          "train_config": dataclasses.asdict(tcfg)}
  every = max(1, tcfg.checkpoint_every // s.updates_per_batch)
  with ckpt_lib.Checkpointer(os.path.join(out_dir, ckpt_lib.CHECKPOINT_SUBDIR),
                             max_to_keep=tcfg.max_to_keep) as ckpt:
    start = ckpt.latest_step()
    if start is not None:
      start, got = ckpt.restore_latest(step_fn.abstract_params, step_fn.abstract_opt_state,
                                       f"round {r} vote_rl")
    if start is None:
      start = 0
      params = jax.tree.map(lambda x: x.copy(), lm.state)   # the round's start model stays
      opt_state = step_fn.init(params)
    else:
      params, opt_state = got["params"], got["opt_state"]
      logging.info("round %d vote_rl: resumed from update %d of %d", r, start, total)
    with preemption.deferred_stop():   # SIGTERM/SIGINT: save after this batch, then stop
      for k in range(start // s.updates_per_batch, s.steps_per_round):
        cur = dataclasses.replace(lm, state=params)            # the trainer's own weights
        idx = _order(ctx, r, len(questions), s, k)
        qs = [{"id": questions[i]["id"], "question": questions[i]["question"]} for i in idx]
        batch, recs, cut = rollout(ctx.sampler_for(cur), ctx.vocab, qs, ctx.prompts(qs), sampling,
                                   ctx.vote_settings, seed=seeds.stream(c.seed, "vote_rl", r, k),
                                   std_normalize=s.std_normalize, seq_len=seq_len)
        if cut:
          logging.warning("round %d vote_rl batch %d: %d path(s) truncated to %d tokens", r, k,
                          cut, seq_len)
        if s.kl_coef:
          batch["ref_logprobs"] = rows_lib.token_logprobs(ref_lm, batch, ctx.vocab.vocab_size,
                                                          s.batch_rows)
        recs = score(recs, [questions[i] for i in idx], ctx.vote_settings.answer_type)
        if distributed.is_main_process():
          jsonl.write_jsonl_atomic(os.path.join(roll_dir, f"batch_{k:05d}.jsonl"), recs)
        for u in range(s.updates_per_batch):
          i = k * s.updates_per_batch + u
          params, opt_state, m = step_fn(params, opt_state, batch, i)
        m = {kk: float(v) for kk, v in jax.device_get(m).items()}
        if not all(np.isfinite(m[x]) for x in ("loss", "grad_norm")):
          raise FloatingPointError(f"round {r} vote_rl batch {k}: non-finite loss {m['loss']}")
        logging.info("round %d vote_rl batch %d/%d: reward=%.3f label_acc=%s loss=%.4f "
                     "clip_frac=%.3f", r, k + 1, s.steps_per_round,
                     np.mean([x for q in recs for x in q["rewards"]]),
                     _mean([q["correct"] for q in recs]), m["loss"], m["clip_frac"])
        done_upd = (k + 1) * s.updates_per_batch
        stop = preemption.stop_requested()
        if (k + 1) % every == 0 or done_upd == total or stop:
          if not ckpt.save(done_upd, params, opt_state, {"batch": k + 1},
                           {**meta, "step": done_upd}):
            raise RuntimeError(f"round {r} vote_rl: checkpoint save for update {done_upd} refused")
        if stop:
          preemption.stop_after_save(stop, ckpt, f"round {r} vote_rl saved a checkpoint at "
                                                 f"update {done_upd} of {total}")
  new = dataclasses.replace(lm, state=params)
  summary = _summary(ctx, roll_dir, s)
  if not st.done:
    wall_s = st.elapsed()
    summary["sample_wall_s"] = 0.0       # sampling is inside the learner's own wall time
    distributed.write_json(summary_path, summary)
    done = os.path.join(out_dir, "done.json")
    distributed.write_json(done, {"wall_s": wall_s, "num_steps": total, "num_truncated": 0})
    st.finish(done, summary_path, wall_s=wall_s)
  ctx.made(new, st.name)
  return new, results.VoteSummary.from_dict(fileio.read_json(summary_path))


def _mean(xs):
  xs = [float(x) for x in xs if x is not None]
  return f"{np.mean(xs):.3f}" if xs else "-"


def _summary(ctx: RunContext, roll_dir: str, s: RlSettings) -> dict:
  recs = [x for k in range(s.steps_per_round)
          for x in jsonl.read_jsonl(os.path.join(roll_dir, f"batch_{k:05d}.jsonl"))]
  out = pl.summarize_votes(recs, ctx.cfg.eval.calibration_bins)
  ra = [x["reward_accuracy"] for x in recs if x["reward_accuracy"] is not None]
  out.update(num_records=0, vote_wall_s=0.0,
             sampled_tokens=int(sum(x["sampled_tokens"] for x in recs)),
             reward_accuracy=float(np.mean(ra)) if ra else None,
             mean_reward=float(np.mean([v for x in recs for v in x["rewards"]])))
  return out
