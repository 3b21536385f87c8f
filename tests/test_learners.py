"""Learners (lmsi_jax/learners/): vote reward, GRPO advantages and clipped objective, DPO,
pair selection (against hand computations), resume after a kill, the round wiring."""
import dataclasses
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmsi_jax import model as model_lib
from lmsi_jax import preemption
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import testing
from lmsi_jax.data import vocab as vocab_lib
from lmsi_jax.learners import objectives
from lmsi_jax.learners import rows as rows_lib
from lmsi_jax.learners import vote_dpo
from lmsi_jax.learners import vote_rl

VS = pl.VoteSettings()


class GoldTrap(dict):
  """A question whose gold fields raise when anything reads them."""

  def __getitem__(self, k):
    if k in ("answer", "cot"):
      raise AssertionError(f"read gold field {k!r}")
    return super().__getitem__(k)

  def get(self, k, default=None):
    if k in ("answer", "cot"):
      raise AssertionError(f"read gold field {k!r}")
    return super().get(k, default)


def _sample(text, seed=0):
  toks = tuple(b + 3 for b in text.encode())
  rng = np.random.default_rng(seed)
  return testing.Sample(text, toks, tuple(float(x) for x in -rng.random(len(toks))))


# ------------------------------------------------------------------ vote reward
def test_vote_reward_is_the_majority_of_the_samples():
  assert objectives.vote_rewards(["3", "3", "4", None]) == ("3", [1.0, 1.0, 0.0, 0.0])
  assert objectives.vote_rewards([None, None]) == (None, [0.0, 0.0])
  assert objectives.vote_rewards(["5", "4"]) == ("4", [0.0, 1.0])     # tie: smallest answer


def test_vote_reward_never_reads_gold():
  """The rollout builds its batch from sampled answers only: gold fields that raise when
  read are never touched, and rewards do not change when gold does."""
  texts = ["x. The answer is 3.", "The answer is 3.", "The answer is 4.", "no answer"]
  fake = testing.ScriptedSampler(lambda ps, s, seed: [[_sample(t, j) for j, t in
                                                        enumerate(texts)] for _ in ps])
  vocab = vocab_lib.byte_vocabulary()
  qs = [GoldTrap(id=f"q{i}", question=f"{i}+1", answer=g, cot="c") for i, g in
        enumerate(["3", "4"])]
  settings = testing.generation.SamplingSettings(num_samples=4)
  rows, recs, cut = vote_rl.rollout(fake, vocab, qs, ["Q: 1+1\nA:", "Q: 2+1\nA:"], settings,
                                    VS, seed=0, std_normalize=True, seq_len=48)
  assert cut == 0
  assert [r["rewards"] for r in recs] == [[1.0, 1.0, 0.0, 0.0]] * 2
  assert [r["answer"] for r in recs] == ["3", "3"]
  a = 0.5 / math.sqrt(1 / 3)           # (1 - 0.5) / std([1, 1, 0, 0], ddof=1)
  np.testing.assert_allclose(rows["advantages"], [a, a, -a, -a] * 2, rtol=1e-5)
  # Gold is read afterwards, for the diagnostics only.
  plain = [dict(q) for q in qs]
  scored = vote_rl.score(recs, plain, "number")
  assert [s["correct"] for s in scored] == [True, False]
  # gold 4: vote rewards [1,1,0,0] vs gold rewards [0,0,1,0] agree on the last path only
  assert scored[0]["reward_accuracy"] == 1.0 and scored[1]["reward_accuracy"] == 0.25
  assert [s["rewards"] for s in scored] == [r["rewards"] for r in recs]


# ------------------------------------------------------------------ advantages
def test_group_advantages_match_hand_computation():
  r = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
  s1 = math.sqrt(1 / 3)                       # std([1,1,0,0], ddof=1)
  s3 = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)
  want = [[0.5 / s1, 0.5 / s1, -0.5 / s1, -0.5 / s1], [0, 0, 0, 0],
          [0.75 / s3, -0.25 / s3, -0.25 / s3, -0.25 / s3]]
  np.testing.assert_allclose(objectives.group_advantages(r), want, rtol=1e-5, atol=1e-6)
  dr = objectives.group_advantages(r, std_normalize=False)       # Dr. GRPO
  np.testing.assert_allclose(dr, [[.5, .5, -.5, -.5], [0] * 4, [.75, -.25, -.25, -.25]])


# ------------------------------------------------------------- clipped objective
def _toy(b=2, t=3, v=5, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
  return logits, targets


def _np_logp(logits, targets):
  lse = np.log(np.exp(logits).sum(-1))
  return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse


def test_clipped_objective_matches_hand_computation():
  logits, targets = _toy()
  lp = _np_logp(logits, targets)
  # old log-probs chosen so the ratios are 1.5, 0.5, 1.1 / 0.7, 1.3, 1.0
  ratios = np.array([[1.5, 0.5, 1.1], [0.7, 1.3, 1.0]])
  old = (lp - np.log(ratios)).astype(np.float32)
  w = np.array([[1, 1, 1], [0, 1, 1]], np.float32)       # row 1's first token: prompt
  adv = np.array([2.0, -1.0], np.float32)
  batch = {"targets": targets, "loss_weights": w, "old_logprobs": old, "advantages": adv}
  loss, wsum, aux = objectives.ClippedPolicyGradient(clip_eps=0.2)(jnp.asarray(logits), batch)
  # by hand: -min(r A, clip(r, 0.8, 1.2) A)
  row0 = [-min(1.5 * 2, 1.2 * 2), -min(0.5 * 2, 0.8 * 2), -min(1.1 * 2, 1.1 * 2)]
  row1 = [0.0, -min(1.3 * -1, 1.2 * -1), -min(1.0 * -1, 1.0 * -1)]
  assert float(wsum) == 5.0
  assert float(loss) == pytest.approx(sum(row0) + sum(row1), rel=1e-5)
  assert float(aux["clip_frac"]) == pytest.approx(3 / 5)        # 1.5, 0.5, 1.3
  # KL term (k3 to a reference)
  ref = (lp - 0.1).astype(np.float32)
  loss_kl, _, aux = objectives.ClippedPolicyGradient(0.2, kl_coef=0.5)(
      jnp.asarray(logits), {**batch, "ref_logprobs": ref})
  k3 = np.exp(-0.1) + 0.1 - 1.0
  assert float(loss_kl) == pytest.approx(sum(row0) + sum(row1) + 0.5 * 5 * k3, rel=1e-5)


CFG = model_lib.ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=64, max_seq_len=64)


def test_one_update_ratio_is_one_and_gradient_is_reinforce(mesh8):
  """Old log-probs from the same weights: ratio 1 and the clipped objective's gradient is
  REINFORCE with the group-mean baseline, -sum(A * grad log p) / tokens (sharded model)."""
  lm = model_lib.LM.init(CFG, mesh8, seed=1)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 100, size=n)) for n in (3, 5, 4, 6, 2, 7, 3, 5)]
  comps = [list(rng.integers(3, 100, size=n)) for n in (4, 2, 6, 3, 5, 1, 2, 4)]
  rows, _ = rows_lib.build(prompts, comps, 16)
  old = rows_lib.token_logprobs(lm, rows, 100, 8)
  adv = objectives.group_advantages(np.array([[1, 0, 0, 1], [1, 1, 1, 0]])).reshape(-1)
  batch = {k: jnp.asarray(v) for k, v in {**rows, "old_logprobs": old, "advantages": adv}.items()}
  loss_fn = objectives.ClippedPolicyGradient(0.2, vocab_limit=100)

  def logits_of(p):
    out, _ = model_lib.forward(lm.graphdef, p, batch["tokens"], batch["positions"],
                               model_lib.segment_mask(batch["segment_ids"]))
    return out

  def clipped(p):
    l, w, aux = loss_fn(logits_of(p), batch)
    return l / w, aux

  def reinforce(p):
    lp = objectives.token_logprobs(logits_of(p), batch["targets"], 100)
    w = batch["loss_weights"]
    return jnp.sum(-batch["advantages"][:, None] * lp * w) / jnp.sum(w)

  with jax.set_mesh(mesh8):
    (lc, aux), g1 = jax.jit(jax.value_and_grad(clipped, has_aux=True))(lm.state)
    lr, g2 = jax.jit(jax.value_and_grad(reinforce))(lm.state)
  assert float(aux["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
  assert float(aux["clip_frac"]) == 0.0
  del lr      # the values differ (-A vs -A log p per token); the gradients do not
  w = np.asarray(rows["loss_weights"])
  assert float(lc) == pytest.approx(float(-(adv[:, None] * w).sum() / w.sum()), abs=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 0


def test_sampler_logprobs_are_the_train_forward_logprobs(mesh8):
  """The old policy is the sampler's own per-token log-probs: they equal the train step's
  (so with one update per batch the ratio is 1 up to float rounding)."""
  from lmsi_jax import sampler
  vocab = vocab_lib.byte_vocabulary()
  cfg = dataclasses.replace(CFG, vocab_size=384, max_seq_len=64)
  lm = model_lib.LM.init(cfg, mesh8, seed=2)
  prompts = ["Q: 1+2\nA:", "Q: 30+4+5\nA:"]
  out = sampler.generate(lm, vocab, prompts, num_samples=4, temperature=1.0,
                         max_decode_steps=12, stop_strings=(), seed=3, batch_size=8)
  ps = [vocab_lib.encode_prompt(vocab, p) for p in prompts for _ in range(4)]
  samples = [s for row in out for s in row]
  rows, _ = rows_lib.build(ps, [list(s.tokens) for s in samples], 32)
  got = rows_lib.token_logprobs(lm, rows, vocab.vocab_size, 8)
  want = rows_lib.place(ps, [list(s.logprobs) for s in samples], 32)
  m = rows["loss_weights"] > 0
  np.testing.assert_allclose(got[m], want[m], atol=2e-4)


# ------------------------------------------------------------------------- DPO
def test_dpo_and_scpo_losses_match_hand_computation():
  logits, targets = _toy(b=4, t=3, v=5, seed=3)
  w = np.array([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]], np.float32)
  seq = (_np_logp(logits, targets) * w).sum(-1)
  ref = np.array([-3.0, -4.0, -2.5, -1.0], np.float32)
  pw = np.array([0.5, 0.5, 0.25, 0.25], np.float32)
  batch = {"targets": targets, "loss_weights": w, "ref_logprob": ref, "pair_weight": pw}
  loss, n, aux = objectives.DirectPreference(beta=0.1)(jnp.asarray(logits), batch)
  m = [0.1 * ((seq[0] - ref[0]) - (seq[1] - ref[1])), 0.1 * ((seq[2] - ref[2]) - (seq[3] - ref[3]))]
  logsig = lambda x: -math.log1p(math.exp(-x))
  assert float(n) == 2.0
  assert float(loss) == pytest.approx(-0.5 * logsig(m[0]) - 0.25 * logsig(m[1]), rel=1e-5)
  assert float(aux["dpo_accuracy"]) == pytest.approx(np.mean([x > 0 for x in m]))
  # ScPO adds the chosen path's length-normalised NLL, weighted by the pair's weight
  nll = [-seq[0] / w[0].sum(), -seq[2] / w[2].sum()]
  loss, n, aux = objectives.DirectPreference(beta=0.1, nll_coef=0.7)(jnp.asarray(logits), batch)
  assert float(n) == 2.0
  assert float(loss) == pytest.approx(0.5 * (-logsig(m[0]) + 0.7 * nll[0])
                                      + 0.25 * (-logsig(m[1]) + 0.7 * nll[1]), rel=1e-5)
  assert float(aux["chosen_nll"]) == pytest.approx(np.mean(nll), rel=1e-5)


def test_dpo_pair_selection_matches_hand_computation():
  # counts: 3 x3, 4 x2, 5 x1 -> chosen: first "3" (0), rejected: first "5" (4), (3-1)/7
  assert objectives.select_pair(["3", "3", "4", None, "5", "3", "4"]) == (0, 4, 2 / 7)
  # least-voted tie (4 and 5 once each): the larger answer, "5"
  assert objectives.select_pair(["3", "3", "4", "5"]) == (0, 3, 0.25)
  # most-voted tie (3 and 4 twice): no margin, no preference
  assert objectives.select_pair(["4", "3", "4", "3"]) is None
  # most "3" (x2); least tie among 4, 5, 6 -> "6"
  assert objectives.select_pair(["4", "3", "5", "3", "6"]) == (1, 4, 0.2)
  assert objectives.select_pair(["3", "3", None]) is None
  assert objectives.select_pair([None, None]) is None
  recs = [{"id": "a", "question": "1+2", "samples": [{"text": t} for t in (
              "The answer is 3.", "The answer is 3.", "The answer is 4.\nQ: x", "junk")]},
          {"id": "b", "question": "2+2", "samples": [{"text": "The answer is 4."}] * 4}]
  pairs = vote_dpo.pairs_from_samples(recs, VS)
  assert len(pairs) == 1
  p = pairs[0]
  assert (p["id"], p["chosen"], p["rejected"], p["weight"]) == ("a", 0, 2, 0.25)
  assert p["rejected_text"] == "The answer is 4."            # cut at the stop
  assert vote_dpo.pairs_from_samples(recs, VS, margin_weighted=False)[0]["weight"] == 1.0


def test_pair_batches_cycle_and_restore():
  rows = {"tokens": np.arange(10)[:, None]}                 # 5 pairs
  it = vote_dpo.PairBatches(rows, 4, seed=0)
  first = [next(it)["tokens"][:, 0].tolist() for _ in range(4)]
  for b in first:     # whole pairs, chosen on even rows
    assert b[0] % 2 == 0 and b[1] == b[0] + 1 and b[2] % 2 == 0 and b[3] == b[2] + 1
  seen = sorted(x // 2 for b in first[:2] for x in b[::2]) + [first[2][0] // 2]
  assert sorted(seen) == [0, 1, 2, 3, 4]                   # an epoch visits every pair once
  again = vote_dpo.PairBatches(rows, 4, seed=0)
  next(again)
  st = again.state()
  resumed = vote_dpo.PairBatches(rows, 4, seed=0)
  resumed.restore(st)
  assert [next(resumed)["tokens"][:, 0].tolist() for _ in range(3)] == first[1:]


# ------------------------------------------------------------ resume after a kill
class Killed(Exception):
  pass


def _script(kill_at=None, sigterm_at=None):
  """Varied answers per (seed, prompt, sample); raises Killed on call number `kill_at`;
  sends this process SIGTERM during call number `sigterm_at` (as a TPU VM's preemption)."""
  n = {"calls": 0}

  def script(prompts, settings, seed):
    n["calls"] += 1
    if kill_at is not None and n["calls"] == kill_at:
      raise Killed()
    if sigterm_at is not None and n["calls"] == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return [[_sample(f"1 + 2 = 3. The answer is {(seed + i + j * j) % 3}.", seed + j)
             for j in range(settings.num_samples)] for i in range(len(prompts))]
  return script


def _ctx(demo_config, workdir, kill_at=None, sigterm_at=None):
  from lmsi_jax import context as context_lib
  cfg = demo_config("smoke", {"guard.probe_n": 0, "train.num_steps": 4, "train.batch_size": 16,
                              "train.checkpoint_every": 2, "train.learning_rate": 1e-2,
                              "vote_rl.questions_per_step": 4, "vote_rl.samples_per_question": 4,
                              "vote_rl.steps_per_round": 4, "vote_rl.kl_coef": 0.1})
  fake = testing.ScriptedSampler(_script(kill_at, sigterm_at))
  return context_lib.build_context(cfg, str(workdir), sampler=fake), fake


def _leaves(lm):
  return [np.asarray(x) for x in jax.tree.leaves(lm.state)]


def test_vote_rl_resumes_after_a_kill_from_its_last_checkpoint(demo_config, tmp_path):
  ref_ctx, ref_fake = _ctx(demo_config, tmp_path / "ref")
  qs = ref_ctx.problem.pool[:12]
  out = lambda c: c.path("round_1", "train")
  ref, summary = vote_rl.train_round(ref_ctx, ref_ctx.base_lm, ref_ctx.base_lm, 1, qs,
                                     out(ref_ctx))
  assert len(ref_fake.calls) == 4 and all(c.num_samples == 4 for c in ref_fake.calls)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(ref), _leaves(ref_ctx.base_lm)))
  assert summary.num_questions == 16 and summary.sampled_tokens > 0
  assert summary.mean_reward is not None and summary.reward_accuracy is not None

  ctx, fake = _ctx(demo_config, tmp_path / "run", kill_at=4)      # dies sampling batch 3
  with pytest.raises(Killed):
    vote_rl.train_round(ctx, ctx.base_lm, ctx.base_lm, 1, qs, out(ctx))
  ckpts = os.listdir(os.path.join(out(ctx), "checkpoints"))
  assert "2" in ckpts and "4" not in ckpts
  ctx2, fake2 = _ctx(demo_config, tmp_path / "run")
  got, summary2 = vote_rl.train_round(ctx2, ctx2.base_lm, ctx2.base_lm, 1, qs, out(ctx2))
  assert [c.seed for c in fake2.calls] == [c.seed for c in ref_fake.calls[2:]]   # batches 2, 3
  for a, b in zip(_leaves(got), _leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert summary2 == summary.__class__(**{**summary.to_dict(), "sample_wall_s": 0.0})
  with open(os.path.join(out(ctx2), "done.json")) as f:
    assert json.load(f)["num_steps"] == 4
  # done: a third call restores the final checkpoint and samples nothing
  ctx3, fake3 = _ctx(demo_config, tmp_path / "run")
  again, _ = vote_rl.train_round(ctx3, ctx3.base_lm, ctx3.base_lm, 1, qs, out(ctx3))
  assert not fake3.calls
  for a, b in zip(_leaves(again), _leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # SIGTERM while batch 0 samples: that batch is trained, saved (update 1, between the
  # periodic saves at 2 and 4), then one Preempted line; the rerun resumes at batch 1
  ctx4, _ = _ctx(demo_config, tmp_path / "term", sigterm_at=1)
  with preemption.preemptible():
    with pytest.raises(preemption.Preempted) as e:
      vote_rl.train_round(ctx4, ctx4.base_lm, ctx4.base_lm, 1, qs, out(ctx4))
  assert str(e.value).startswith("preempted by SIGTERM: round 1 vote_rl saved a checkpoint at "
                                 "update 1 of 4 in ")
  assert sorted(os.listdir(os.path.join(out(ctx4), "checkpoints"))) == ["1"]
  ctx5, fake5 = _ctx(demo_config, tmp_path / "term")
  got5, _ = vote_rl.train_round(ctx5, ctx5.base_lm, ctx5.base_lm, 1, qs, out(ctx5))
  assert [c.seed for c in fake5.calls] == [c.seed for c in ref_fake.calls[1:]]
  for a, b in zip(_leaves(got5), _leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _write_samples(ctx, qs):
  from lmsi_jax.data import jsonl
  recs = [{"id": q["id"], "question": q["question"], "samples": [
      {"text": f"The answer is {i if j < 3 or i % 3 == 0 else i + 1}.", "mean_logprob": -0.5,
       "num_tokens": 16,
       "stop_reason": "eos"} for j in range(4)]} for i, q in enumerate(qs)]
  jsonl.write_jsonl_atomic(ctx.path("round_1", "samples", "shard_00000.jsonl"), recs)


def test_vote_dpo_resumes_after_a_kill_from_its_last_checkpoint(demo_config, tmp_path,
                                                                monkeypatch):
  ref_ctx, _ = _ctx(demo_config, tmp_path / "ref")
  qs = ref_ctx.problem.pool[:12]
  _write_samples(ref_ctx, qs)
  out = lambda c: c.path("round_1", "train")
  ref = vote_dpo.train_round(ref_ctx, ref_ctx.base_lm, 1, out(ref_ctx))
  pairs = [json.loads(l) for l in open(ref_ctx.path("round_1", "pairs.jsonl"))]
  assert len(pairs) == 8          # 12 questions, every third unanimous
  assert {p["weight"] for p in pairs} == {0.5}                     # (3 - 1) / 4
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(ref), _leaves(ref_ctx.base_lm)))

  ctx, _ = _ctx(demo_config, tmp_path / "run")
  _write_samples(ctx, qs)
  real_next, n = vote_dpo.PairBatches.__next__, {"calls": 0}

  def dying_next(self):
    n["calls"] += 1
    if n["calls"] == 4:           # batch of step 3: steps 0-1 saved at 2
      raise Killed()
    return real_next(self)
  monkeypatch.setattr(vote_dpo.PairBatches, "__next__", dying_next)
  with pytest.raises(Killed):
    vote_dpo.train_round(ctx, ctx.base_lm, 1, out(ctx))
  monkeypatch.setattr(vote_dpo.PairBatches, "__next__", real_next)
  assert "2" in os.listdir(os.path.join(out(ctx), "checkpoints"))
  ctx2, _ = _ctx(demo_config, tmp_path / "run")
  got = vote_dpo.train_round(ctx2, ctx2.base_lm, 1, out(ctx2))
  for a, b in zip(_leaves(got), _leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ round wiring
@pytest.mark.parametrize("learner,want", [
    ("sft", ["sample_and_vote", "train"]),
    ("vote_dpo", ["sample_and_vote", "vote_dpo"]),
    ("vote_rl", ["vote_rl"])])
def test_rounds_learner_picks_the_round_stages(demo_config, tmp_path, learner, want):
  """rounds.learner routes each round: sft trains on the pseudo-labels, vote_dpo on the
  round's vote store, vote_rl samples its own (the round's sampling stage does not run)."""
  from lmsi_jax import results, rounds
  ctx, _ = _ctx(demo_config, tmp_path)
  cfg = ctx.cfg.copy_and_resolve_references()
  cfg.rounds.update(num_rounds=1, learner=learner, seed_weight=1.0)
  ctx = ctx.replace(cfg=cfg)
  calls = []
  ev = results.EvalResult(greedy_acc=0.5, sc_acc=0.5, num_questions=0, sc_num_samples=0,
                          sc_temperature=0.0, mean_vote_share=0.0, greedy_parse_rate=0.0,
                          calibration=[], extraction=None, examples=[])
  summary = results.VoteSummary(
      num_questions=3, num_voted=0, num_pseudo_labels=0, num_records=0,
      pseudo_label_precision=None, mean_vote_share=0.0, pass_at_k=None, maj_at_k=None,
      mean_distinct_answers=0.0, mean_distinct_paths=0.0, pool_calibration=None,
      sampled_tokens=7)

  def trained(name, lm, out_dir):
    calls.append(name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "done.json"), "w") as f:
      json.dump({"wall_s": 1.0}, f)
    return dataclasses.replace(lm)

  st = dataclasses.replace(
      rounds.STAGES,
      sample_and_vote=lambda c, lm, r, step, qs=None: calls.append("sample_and_vote") or summary,
      train=lambda c, lm, mix, out_dir, **kw: trained("train", lm, out_dir),
      vote_dpo=lambda c, lm, r, out_dir: trained("vote_dpo", lm, out_dir),
      vote_rl=lambda c, lm, ref, r, qs, out_dir: (trained("vote_rl", lm, out_dir), summary),
      evaluate=lambda c, lm, path, t, off: ev)
  base = results.BaseResult(ctx.replace(seed_task=None), ctx.base_lm, 0, ev)
  from lmsi_jax import stages
  base = dataclasses.replace(base, ctx=base.ctx.replace(seed_task=stages.seed_data(base.ctx)))
  res = rounds.run_lmsi(base.ctx, base, st)
  assert calls == want
  assert res.rows()[0]["sampled_tokens"] == 7 and res.rows()[0]["wall_s"] == 1.0


# ---------------------------------------------------------- the comparison (smoke)
@pytest.mark.slow
def test_learners_smoke_compares_the_three_from_one_base(tmp_path):
  """configs/demo.py:learners_smoke: each learner's rows under its name, the same
  sampled-path budget per round, one vote store for round 1 (vote_dpo reads sft's samples)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  workdir = tmp_path / "run"
  p = subprocess.run([sys.executable, "-m", "lmsi_jax.main",
                      "--config=configs/demo.py:learners_smoke", f"--workdir={workdir}"],
                     cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
  assert p.returncode == 0, p.stderr[-4000:]
  rep = json.loads((workdir / "report.json").read_text())
  table = rep["learners"]
  assert sorted(table) == ["sft", "vote_dpo", "vote_rl"]     # report.json sorts its keys
  for name, v in table.items():
    assert [r["round"] for r in v["rounds"]] == [1, 2] and v["final"]["round"] == 2, name
    for row in v["rounds"]:
      assert 0 <= row["greedy_acc"] <= 1 and 0 <= row["sc_acc"] <= 1 and row["wall_s"] > 0
      assert row["sampled_tokens"] > 0
    assert v["sampled_tokens"] == sum(r["sampled_tokens"] for r in v["rounds"])
  assert table["sft"]["spurious"] is not None and table["vote_rl"]["spurious"] is None
  assert all(r["reward_accuracy"] is not None for r in table["vote_rl"]["rounds"])
  assert rep["rounds"] == table["sft"]["rounds"]
  for r in (1, 2):    # budget: vote_rl samples as many paths per round (48 questions x 4)
    d = workdir / "vote_rl" / f"round_{r}" / "train" / "rollouts"
    recs = [json.loads(l) for f in sorted(os.listdir(d)) for l in open(d / f)]
    assert len(recs) == 6 * 8 and sum(x["total"] for x in recs) == 48 * 4
    assert not (workdir / "vote_rl" / f"round_{r}" / "samples").exists()
    pairs = (workdir / "vote_dpo" / f"round_{r}" / "pairs.jsonl").read_text().splitlines()
    done = json.loads((workdir / "vote_dpo" / f"round_{r}" / "train" / "done.json").read_text())
    assert done["num_pairs"] == len(pairs)
  # one vote store: vote_dpo's round 1 pairs come from sft's round-1 samples
  assert not (workdir / "vote_dpo" / "round_1" / "samples").exists()
  assert (workdir / "vote_dpo" / "round_2" / "samples").exists()
  assert (table["vote_dpo"]["rounds"][0]["sampled_tokens"]
          == table["sft"]["rounds"][0]["sampled_tokens"])
  assert (workdir / "learners.png").stat().st_size > 0
  assert "## Learners" in (workdir / "report.md").read_text()


def test_seed_aggregate_carries_each_learner():
  """--seeds over mode "learners": mean ± sd of every learner's rows (multiseed.headline)."""
  from lmsi_jax import multiseed
  row = lambda g, extra=None: {"round": 1, "greedy_acc": g, "sc_acc": g + 0.1,
                               "pseudo_label_precision": 0.5, **(extra or {})}
  def rep(g):
    return {"base": {"greedy_acc": 0.1, "sc_acc": 0.2}, "rounds": [row(g)],
            "final": {"round": 1, "greedy_acc": g, "sc_acc": g + 0.1},
            "learners": {
                "sft": {"rounds": [row(g)], "final": {"greedy_acc": g, "sc_acc": g + 0.1},
                        "sampled_tokens": 100, "wall_s": 5.0, "spurious": {"greedy_acc": 0.05}},
                "vote_rl": {"rounds": [row(g / 2, {"reward_accuracy": 0.7})],
                            "final": {"greedy_acc": g / 2, "sc_acc": 0.0},
                            "sampled_tokens": 110, "wall_s": 6.0, "spurious": None}}}
  agg = multiseed.aggregate({0: rep(0.4), 1: rep(0.6)})
  assert agg["mean"]["sft_round1_greedy"] == pytest.approx(0.5)
  assert agg["mean"]["vote_rl_final_greedy"] == pytest.approx(0.25)
  assert agg["mean"]["vote_rl_round1_reward_accuracy"] == pytest.approx(0.7)
  assert agg["mean"]["sft_spurious_greedy"] == pytest.approx(0.05)
  assert agg["mean"]["vote_rl_sampled_tokens"] == 110
  md = multiseed.to_markdown(agg)
  assert "| vote_rl_sampled_tokens | 110 | 110 | 110 ± 0 |" in md
