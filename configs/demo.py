"""The embedded demo: LMSI on built-in synthetic sums, no files, no downloads.

  python -m lmsi_jax.main --config=configs/demo.py --workdir=/tmp/lmsi_demo
  python -m lmsi_jax.main --config=configs/demo.py:smoke --workdir=/tmp/lmsi_smoke

A ~100k-parameter byte-level model (fan-in scaled init) is trained from scratch on 50,000 labeled
easy sums (2-4 terms) plus 40 labeled 5-term examples at 2% of the data (stage 0, 3,000 steps),
then self-improves for 4 rounds (32 paths per question at T=1.0, a question's majority paths
kept when the majority holds >= 30% of the votes, 300 fine-tuning steps each) on 1,000
unlabeled 5-term questions. Three reference
arms use the identical fine-tuning recipe: oracle (gold chains of thought for
the same pool), control (the same extra steps on the seed data only) and
spurious (LMSI's own samples, but a random non-majority answer's paths). A
label-free collapse guard watches 200 held-out unlabeled questions.

  python -m lmsi_jax.main --config=configs/demo.py --workdir=/tmp/lmsi_demo5 --seeds=0-4
"""

from lmsi_jax import config as config_lib


def get_config(arg: str | None = None):
  if arg in ("format_ablation", "format_ablation_smoke", "strategy", "strategy_smoke"):
    return _study(get_config("smoke" if arg.endswith("_smoke") else None), arg.split("_smoke")[0])
  if arg in ("learners", "learners_smoke"):
    return _learners(get_config("smoke" if arg == "learners_smoke" else None),
                     arg == "learners_smoke")
  if arg in ("w2s", "w2s_smoke"):
    return _w2s(get_config("smoke" if arg == "w2s_smoke" else None), arg == "w2s_smoke")
  c = config_lib.base_config()
  c.seed = 0
  c.model.preset = "tiny"
  # Fan-in init (projections N(0, 1/fan_in), residual outputs also / sqrt(2L)) instead of
  # N(0, 0.02): at width 64, 0.02 is 6x below 1/sqrt(64). With N(0, 0.02) seed 4's init left
  # stage 0 with little self-consistency headroom and LMSI gained +2.2 there; with fan_in
  # every one of five seeds gains 20-38 points (BENCHMARKS.md, recipe 3).
  c.model.init = "fan_in"
  c.task.name = "synthetic"
  # Stage 0 data: 50,000 labeled easy sums (2-4 terms, questions may repeat with other
  # orders) and 40 labeled 5-term sums, each 25 times (2% of the seed data). With 20 of them
  # 50 times (recipe 4) stage 0 sometimes left little self-consistency headroom, and those
  # were the seeds where LMSI gained least (on an Intel model 167, default threads, seed 0:
  # greedy 21.0%, SC@16 28.4%, +9.0 over control); with 40, SC@16 was 20-24 points above
  # greedy on each of seeds 0-2 there (BENCHMARKS.md, recipe 5). The pool's last 200
  # questions are the collapse guard's unlabeled probe: 1,000 are sampled.
  c.synthetic.update(seed_easy_n=50_000, seed_easy_terms=(2, 4), seed_hard_n=40,
                     seed_hard_repeat=25, hard_terms=5, pool_n=1200, eval_n=500,
                     num_exemplars=0)
  c.guard.update(probe_n=200)
  # One format, zero-shot CoT (LMSI Table 2, format 3): a 100k-parameter model cannot answer a
  # 5-term sum without its chain of thought, and the direct format's half of every batch cost
  # stage 0 14 points greedy (BENCHMARKS.md); few-shot formats need exemplars in the context.
  c.formats = ("zero_shot_cot",)
  c.prompt_format = "zero_shot_cot"
  c.sampling.update(num_samples=32, temperature=1.0, top_k=0, top_p=1.0, max_decode_steps=64,
                    batch_size=1024, questions_per_shard=250)
  # Small batches, many steps: at the same tokens, 3,000 steps of 16 rows reach 78% greedy
  # where 1,500 of 32 reach 42% (BENCHMARKS.md).
  c.base_train.update(enabled=True, num_steps=3000, learning_rate=3e-3, warmup_steps=100,
                      schedule="cosine", batch_size=16, weight_decay=0.01, checkpoint_every=1000)
  c.train.update(optimizer="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=30,
                 num_steps=300, batch_size=16, seq_len=96, clip_norm=1.0, weight_decay=0.01,
                 b2=0.98, end_lr_ratio=0.1, log_every=100, checkpoint_every=300)
  # Remat the layer body: the backward pass recomputes each layer's activations instead of
  # the scan stacking them (copies, broadcasts, dynamic slices of [2, 16, 4, 96, 96] attention
  # residuals). Same weights to the bit on a 2-core AMD EPYC (family 25 model 1; seeds 0 and 3
  # gave recipe 5's reports to the last digit), the step 0.63x as long there
  # (benchmarks/demo_step.py, BENCHMARKS.md "Remat in the demo's train step").
  c.train.remat = "dots"
  # 4 rounds: on the tuning seeds 0-2 greedy accuracy still rose 3-7 points in round 3.
  # With 16 paths and 3 rounds (--config.sampling.num_samples=16 --config.rounds.num_rounds=3)
  # a seed took 0.67x as long on a 2-core AMD EPYC (family 25 model 1) and met every target on
  # five seeds, with thinner margins: PGR 0.78 +- 0.12 against 0.86 +- 0.09 (BENCHMARKS.md,
  # "Recipe 6 measured, not adopted").
  c.rounds.update(num_rounds=4, init="continue", pseudo_weight=0.5, seed_weight=0.5,
                  previous_weight=0.0)
  # Keep a question's majority paths only when the majority holds >= 30% of its 32 votes (no
  # labels read): on seeds 0-2 it raised the margin over control from +19.3 to +26.0 points
  # and mean PGR from 0.48 to 0.63; seeds 3-4 confirmed it untuned (BENCHMARKS.md, recipe 4).
  c.voting.min_vote_share = 0.3
  c.eval.update(num_samples=16, temperature=1.0, base_temperature=1.0, top_k=0,
                max_decode_steps=64, oracle=True, control=True, spurious=True)
  if arg == "smoke":
    # Sized so that few training epochs end early: each epoch rebuilds its tf.data pipeline
    # (~1 s on a 2-core AMD EPYC, family 26 model 2), and with 400 seed sums and 12 steps a
    # round the smoke run built 34 pipelines; with 2,500 and 6 it builds 20 (BENCHMARKS.md).
    c.synthetic.update(seed_easy_n=2500, seed_hard_n=10, seed_hard_repeat=1, pool_n=64,
                       eval_n=32)
    c.guard.probe_n = 16
    c.sampling.update(num_samples=4, batch_size=64, questions_per_shard=16)
    # 150 steps: a base whose paths end with an answer, so the rounds have pseudo-labels
    # to vote and keep (at 40 steps no path parsed and the rounds trained on seed data only).
    c.base_train.update(num_steps=150, warmup_steps=5, checkpoint_every=50)
    c.train.update(num_steps=6, batch_size=16, log_every=3, checkpoint_every=3)
    c.rounds.num_rounds = 2
    c.eval.update(num_samples=4)
  elif arg:
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (known: smoke, format_ablation[_smoke], strategy[_smoke], w2s, w2s_smoke, learners[_smoke])")
  return c


def _learners(c, smoke: bool):
  """One vote store, three learners (lmsi_jax/learners/): sft (LMSI), vote_rl (TTRL-style
  GRPO, majority = reward) and vote_dpo (ScPO-style DPO), from one base model, with the same
  sampled-path budget per round and the same evaluation; the spurious arm for sft.

  Budget: sft and vote_dpo sample the pool (1,000 questions x 32 paths) once per round;
  vote_rl samples 25 batches of 40 questions x 32 paths = 32,000 paths per round, on policy.
  report.md's learners table lists each learner's sampled tokens. vote_rl's learning rate is
  a first guess, not tuned. vote_dpo's beta = 5 and learning rate 3e-4 (with ScPO's NLL term)
  were picked on seed 0's round 1 from eight settings (BENCHMARKS.md, "Three learners"): plain
  DPO at beta 0.1, lr 1e-4 drove the model to ~0%.

    python -m lmsi_jax.main --config=configs/demo.py:learners --workdir=DIR --seeds=0-2
  """
  c.mode = "learners"
  c.voting.min_vote_share = 0.0   # the learners were measured with recipe 3's voting
  if not smoke:   # ... and its stage-0 data (20 labeled 5-term sums, 50 times each)
    c.synthetic.update(seed_hard_n=20, seed_hard_repeat=50)
  c.eval.update(oracle=False, control=False)
  c.guard.probe_n = 0     # every learner runs every round
  c.learners.compare = ("sft", "vote_rl", "vote_dpo")
  c.synthetic.pool_n = 1000   # no probe held out of it
  c.vote_rl.update(questions_per_step=40, samples_per_question=32, steps_per_round=25,
                   updates_per_batch=1, clip_eps=0.2, std_normalize=True, kl_coef=0.0,
                   learning_rate=1e-4)
  c.vote_dpo.update(beta=5.0, nll_coef=1.0, margin_weighted=True, learning_rate=3e-4)
  if smoke:   # pool 48 x 4 paths; vote_rl: 6 batches of 8 questions x 4 paths = 192 paths
    c.synthetic.pool_n = 48
    c.vote_rl.update(questions_per_step=8, samples_per_question=4, steps_per_round=6)
  return c


def _w2s(c, smoke: bool):
  """Weak-to-strong (lmsi_jax/w2s.py): the demo's base model is the teacher; a 4-layer,
  width-128 student pretrained on the easy sums only learns 5-term sums from its labels."""
  c.mode = "w2s"
  c.voting.min_vote_share = 0.0   # the teacher's labels as measured (recipe 3's voting)
  c.guard.probe_n = 0     # the teacher labels the whole pool; no LMSI rounds to guard
  c.eval.spurious = False
  c.w2s.update(student_preset="small", pretrain_steps=20 if smoke else 800, labels="vote",
               losses=("xent", "confidence"), replay_weight=0.5)
  # The student's fine-tunes (ceiling and teacher labels alike): 600 steps decaying to 0.1x.
  # With the rounds' 200 constant-lr steps the student on gold stayed below the teacher.
  c.train.update(schedule="cosine", learning_rate=1e-3)
  if not smoke:
    c.train.num_steps = 600
    c.base_train.num_steps = 1200   # the weak teacher measured in BENCHMARKS.md
  else:
    c.train.checkpoint_every = 1000
  return c


def _study(c, name: str):
  """Studies on the demo (lmsi_jax/ablation.py); every other value is the demo's.

  format_ablation: LMSI Table 5, one round from one base model per format setting. The
  base trains on the seed data in all four formats, so the few-shot ones need exemplars
  (2 from the seed data) and longer sequences; prompting is few-shot CoT.
  strategy: rounds.init continue vs restart, the demo's rounds, from one base model.
  """
  c.eval.update(oracle=False, control=False, spurious=False)   # studies compare settings, not arms
  c.guard.probe_n = 0     # ... and run every round of each setting
  c.voting.min_vote_share = 0.0   # the studies were measured with recipe 3's voting
  if name == "strategy":
    c.mode = "strategies"
    return c
  c.mode = "format_ablation"
  c.synthetic.num_exemplars = 2
  c.formats = ("few_shot_cot", "few_shot_direct", "zero_shot_cot", "zero_shot_direct")
  c.prompt_format = "few_shot_cot"
  c.train.seq_len = 256
  c.rounds.num_rounds = 1
  return c
