"""Learner `vote_dpo` (ScPO-style): DPO on (most-voted, least-voted) path pairs.

Reads the round's vote store only (DIR/round_<r>/samples, voted again with the
run's vote settings exactly as votes.jsonl was): per question with at least
two distinct parsed answers, one pair (`objectives.select_pair`: the first path
reaching the most-voted answer, the first reaching the least-voted one),
weighted by the vote margin (count(most) - count(least)) / m as in ScPO
(`vote_dpo.margin_weighted=False`: weight 1). Prompt = the prompt the paths
were sampled with; completion = the path's CoT target (as SFT trains on it)
plus EOS. The reference is the round's starting model, frozen (iterative DPO,
as ScPO); its summed completion log-probs are computed once per round.

The loss is ScPO's: the weighted DPO loss (beta = vote_dpo.beta) plus
vote_dpo.nll_coef times the chosen path's length-normalised NLL, weighted
alike (`objectives.DirectPreference`; nll_coef=0 is plain DPO, which drove the
demo's model to ~0% in BENCHMARKS.md).

Training is `train.train` with `objectives.DirectPreference` as the loss (so
checkpoints, resume after a kill, preemption and the non-finite check are the
SFT learner's): train.num_steps steps of train.batch_size rows (batch_size/2
pairs, chosen on even rows), pairs in a seeded order, epoch after epoch.
DIR/round_<r>/pairs.jsonl lists the round's pairs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import jax
import numpy as np

from lmsi_jax import distributed
from lmsi_jax import formats as formats_lib
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import seeds
from lmsi_jax import train as train_lib
from lmsi_jax import voting
from lmsi_jax.context import TRAIN_KEYS, VOTE_KEYS, RunContext
from lmsi_jax.data import jsonl
from lmsi_jax.data import vocab as vocab_lib
from lmsi_jax.learners import objectives
from lmsi_jax.learners import rows as rows_lib

KEYS = TRAIN_KEYS + VOTE_KEYS + ("rounds.learner", "rounds.init", "vote_dpo", "prompt_format")


def pairs_from_samples(sample_records, vote_settings: pl.VoteSettings, *,
                       margin_weighted: bool = True) -> list[dict]:
  """One pair per question that has one (see the module docstring); reads sample
  records (id, question, sampled texts) only."""
  out = []
  for rec in sample_records:
    texts, _, _, answers = pl.vote_record(rec, vote_settings)
    pick = objectives.select_pair(answers)
    if pick is None:
      continue
    c, rj, w = pick
    out.append({"id": rec["id"], "question": rec["question"], "chosen": c, "rejected": rj,
                "chosen_answer": answers[c], "rejected_answer": answers[rj],
                "weight": w if margin_weighted else 1.0,
                "chosen_text": voting.truncate_at_stop(texts[c], vote_settings.stop),
                "rejected_text": voting.truncate_at_stop(texts[rj], vote_settings.stop)})
  return out


def pair_rows(ctx: RunContext, pairs, seq_len: int):
  """Rows 2i (chosen), 2i+1 (rejected) of every pair; (rows, truncated)."""
  vocab, prompts, comps = ctx.vocab, [], []
  for p in pairs:
    ids = vocab_lib.encode_prompt(vocab, ctx.prompts([p])[0])
    for key in ("chosen_text", "rejected_text"):
      prompts.append(ids)
      comps.append(list(vocab.encode(formats_lib.cot_target(p[key]))) + [vocab.eos_id])
  rows, cut = rows_lib.build(prompts, comps, seq_len)
  rows["pair_weight"] = np.repeat(np.asarray([p["weight"] for p in pairs], np.float32), 2)
  return rows, cut


class PairBatches(Iterator[dict]):
  """`batch_size` rows (whole pairs) per batch, pairs in a seeded order per epoch;
  `state()`/`restore()` make its position part of a checkpoint."""

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int):
    self.rows, self.pairs, self.seed = rows, len(rows["tokens"]) // 2, seed
    self.per_batch, self.pos = batch_size // 2, 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(
        self.pairs)

  def __next__(self) -> dict:
    idx = []
    while len(idx) < self.per_batch:
      epoch, i = divmod(self.pos, self.pairs)
      idx.append(int(self._order(epoch)[i]))
      self.pos += 1
    r = np.asarray([2 * i + j for i in idx for j in (0, 1)])
    return {k: v[r] for k, v in self.rows.items()}

  def state(self) -> dict:
    return {"pos": self.pos}

  def restore(self, state) -> None:
    self.pos = int(state["pos"])


def train_round(ctx: RunContext, lm, r: int, out_dir: str):
  """Round r of vote_dpo from `lm` (also the frozen reference); returns the new lm."""
  c = ctx.cfg
  if getattr(lm, "frozen", None) is not None or c.train.lora.rank:
    raise ValueError("config.rounds.learner='vote_dpo' trains every weight: set train.lora.rank=0")
  if jax.process_count() > 1:   # its batches are built whole on every host (not yet split)
    raise ValueError("config.rounds.learner='vote_dpo' runs in one process only (for now)")
  rdir = os.path.dirname(out_dir)
  samples_dir = ctx.path(f"round_{r}", "samples")
  pairs_path = os.path.join(rdir, "pairs.jsonl")
  st = ctx.stage(out_dir, KEYS, inputs=[ctx.origin(lm), ctx.stage_name(f"round_{r}", "samples")],
                 extra={"round": r})
  if not st.done:
    st.begin(out_dir, pairs_path)
  pairs = pairs_from_samples(pl.read_samples(samples_dir), ctx.vote_settings,
                             margin_weighted=c.vote_dpo.margin_weighted)
  if distributed.is_main_process() and not st.done:
    jsonl.write_jsonl_atomic(pairs_path, pairs)
  tcfg = ctx.train_config()
  if pairs:
    seq_len = min(rows_lib.row_length(
        [len(vocab_lib.encode_prompt(ctx.vocab, p)) for p in ctx.prompts(ctx.problem.pool)],
        c.sampling.max_decode_steps + 2), lm.cfg.max_seq_len)
    tcfg = dataclasses.replace(tcfg, seq_len=seq_len,
                               learning_rate=c.vote_dpo.learning_rate or tcfg.learning_rate)
    if tcfg.batch_size % 2:
      raise ValueError(f"config.train.batch_size={tcfg.batch_size}: vote_dpo needs an even "
                       "batch (chosen and rejected rows)")
    rows, cut = pair_rows(ctx, pairs, seq_len)
    if cut:
      logging.warning("round %d vote_dpo: %d path(s) truncated to %d tokens", r, cut, seq_len)
    ref = rows_lib.token_logprobs(lm, rows, ctx.vocab.vocab_size, tcfg.batch_size)
    rows["ref_logprob"] = (ref * rows["loss_weights"]).sum(-1).astype(np.float32)
    batches = PairBatches(rows, tcfg.batch_size, seeds.stream(c.seed, "vote_dpo", r))
    start = dataclasses.replace(lm, state=jax.tree.map(lambda x: x.copy(), lm.state))
    new = train_lib.train(start, batches, tcfg, out_dir, config_json=c.to_json(),
                          desc=os.path.relpath(out_dir, ctx.workdir),
                          loss_fn=objectives.DirectPreference(
                              c.vote_dpo.beta, c.vote_dpo.nll_coef, ctx.vocab.vocab_size))
  else:
    logging.warning("round %d vote_dpo: no question's vote prefers one answer to another (every "
                    "vote unanimous or tied); the round makes no update", r)
    new, cut = dataclasses.replace(lm), 0
  if not st.done:
    done = os.path.join(out_dir, "done.json")
    wall_s = st.elapsed()
    distributed.write_json(done, {"wall_s": wall_s, "num_steps": tcfg.num_steps if pairs else 0,
                                  "num_truncated": cut, "num_pairs": len(pairs)})
    st.finish(done, pairs_path, wall_s=wall_s)
  ctx.made(new, st.name)
  return new
