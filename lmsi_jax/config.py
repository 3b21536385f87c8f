"""The one config schema (ml_collections), grouped by stage.

Config files in `configs/` start from `base_config()` and change what they
need; `main.py` loads them locked, so a mistyped `--config.a.b=` override is
an error. Shared references: none; every leaf is independent.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from lmsi_jax import extractors
from lmsi_jax import formats as formats_lib
from lmsi_jax import modes
from lmsi_jax import voting


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "lmsi"               # what main runs: a lmsi_jax.modes.MODES name

  # Device mesh over (data, fsdp, model); -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  # Multi-host: see lmsi_jax/distributed.py (initialises when the coordinator
  # fields are set or a TPU pod / SLURM / MPI cluster is detected).
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, initialization_timeout=300,
      heartbeat_timeout_seconds=100))

  # Persistent XLA compilation cache (lmsi_jax/compile_cache.py): a re-run loads what it
  # compiled before (one subdirectory per host CPU). dir="" turns it off; an explicit
  # JAX_COMPILATION_CACHE_DIR in the environment wins.
  c.compile_cache = ml_collections.ConfigDict(dict(
      dir="~/.cache/lmsi_jax/xla", min_compile_time_secs=0.1))

  c.model = ml_collections.ConfigDict(dict(
      preset="tiny",            # a lmsi_jax.model.PRESETS name; ignored when checkpoint is set
      init="",                  # fresh weights: "" (the preset's), "normal" or "fan_in"
                                # (lmsi_jax.model.ModelConfig.init); ignored with a checkpoint
      checkpoint="",            # HF directory, .gguf file, or an lmsi_jax Orbax checkpoint dir
      param_dtype="float32",
      dtype="float32",          # compute dtype ("bfloat16" = mixed precision, f32 master weights)
      max_seq_len=0,            # 0 = the preset's / checkpoint's context
  ))

  c.task = ml_collections.ConfigDict(dict(
      name="synthetic",         # "synthetic" (built in) | "gsm8k"
      answer_type="number",     # one of voting.ANSWER_TYPES
      cue="The answer is",
      stop="\nQ:",              # generations are cut at the next question
      extractor="lmsi",         # answer extractor, a lmsi_jax.extractors.EXTRACTORS name
  ))
  # Built-in synthetic sums (task.name == "synthetic").
  c.synthetic = ml_collections.ConfigDict(dict(
      seed_easy_n=3000, seed_easy_terms=(2, 4), seed_hard_n=20, hard_terms=5,
      pool_n=1000, eval_n=500, num_exemplars=2,
      seed_hard_repeat=1))      # each labeled hard example appears this many times in the seed data
  # GSM8K (task.name == "gsm8k"): JSONL dir with train.jsonl/test.jsonl, or TFDS.
  c.data = ml_collections.ConfigDict(dict(
      source="jsonl", dir="", pool_split="train", eval_split="test",
      pool_limit=0, eval_limit=0, on_error="raise",
      cot_exemplars="", standard_exemplars=""))

  # Mixed formats of the pseudo-labels (LMSI Table 2); the prompt used to sample.
  c.formats = formats_lib.FORMATS
  c.prompt_format = "few_shot_cot"

  c.sampling = ml_collections.ConfigDict(dict(
      num_samples=32, temperature=0.7, top_k=40, top_p=1.0, max_decode_steps=256,
      batch_size=256, questions_per_shard=256))
  c.voting = ml_collections.ConfigDict(dict(
      min_vote_share=0.0, max_paths=0, dedup=False, weighted=False, fallback_last_number=False))

  # Fine-tuning recipe (every round, and the oracle/control arms alike).
  c.train = ml_collections.ConfigDict(dict(
      optimizer="adamw", learning_rate=5e-5, schedule="constant", warmup_steps=0,
      num_steps=10_000, batch_size=32, seq_len=1024, grad_accum=1, clip_norm=1.0,
      weight_decay=0.0, decay_embeddings=False, b1=0.9, b2=0.999, eps=1e-8, end_lr_ratio=0.1,
      log_every=50, checkpoint_every=1000, max_to_keep=2,
      # Per-block rematerialisation in the training backward pass (sampling never remats):
      # "none" | "full" (keep block inputs only) | "dots" (also weight-matmul outputs).
      remat="none",
      # Logical input shards (0 = one per process). Fix it to make batches, and so
      # results, independent of how many processes run the job.
      data_shards=0,
      # LoRA (lmsi_jax/lora.py): rank 0 = off (full fine-tuning). Otherwise only adapters on
      # the `targets` projections (q k v o gate up down, weight names, or path regexes like
      # "layers/3/attn/q_proj") are trained, scaled by alpha/rank; rounds sample with the
      # adapters merged into the weights. Stage 0 (base_train) is always full training.
      lora=ml_collections.ConfigDict(dict(
          rank=0, targets=("q", "k", "v", "o", "gate", "up", "down"), alpha=16.0,
          dropout=0.0))))
  # Stage 0: train the base model from scratch on labeled seed data (built-in task).
  c.base_train = ml_collections.ConfigDict(dict(
      enabled=False, num_steps=0, learning_rate=1e-3, warmup_steps=100, schedule="cosine",
      batch_size=32, weight_decay=0.0,
      checkpoint_every=0))      # 0 = train.checkpoint_every

  c.rounds = ml_collections.ConfigDict(dict(
      num_rounds=1,             # LMSI is one round; more is our extension
      init="continue",          # "continue" from the last round | "restart" from the base
      pseudo_weight=1.0,        # mixture weight of the latest round's pseudo-labels
      seed_weight=0.0,          # ... of the labeled seed data
      previous_weight=0.0,      # ... of earlier rounds' pseudo-labels (split evenly)
      early_stop_patience=0,    # stop after this many rounds without a better held-out
                                # greedy accuracy (0 = off; see lmsi_jax/early_stop.py)
      # What a round learns from its votes (lmsi_jax/learners/): "sft" (LMSI: fine-tune on
      # the majority paths) | "vote_rl" (TTRL: GRPO, majority = reward) | "vote_dpo" (ScPO:
      # DPO on most- vs least-voted paths).
      learner="sft"))
  # Learner vote_rl (lmsi_jax/learners/vote_rl.py); optimizer and schedule are train.*.
  c.vote_rl = ml_collections.ConfigDict(dict(
      questions_per_step=8, samples_per_question=8, steps_per_round=4, updates_per_batch=1,
      clip_eps=0.2, std_normalize=True,   # False: Dr. GRPO (advantages not divided by std)
      kl_coef=0.0,                        # k3 KL to the frozen base model
      learning_rate=0.0))                 # 0 = train.learning_rate
  # Learner vote_dpo (lmsi_jax/learners/vote_dpo.py); steps and batch are train.*.
  c.vote_dpo = ml_collections.ConfigDict(dict(
      beta=0.1, margin_weighted=True,
      nll_coef=1.0,             # ScPO's NLL term on the chosen path (0: plain DPO)
      learning_rate=0.0))       # 0 = train.learning_rate
  # mode="learners" (lmsi_jax/learners/compare.py): these learners from one base model.
  c.learners = ml_collections.ConfigDict(dict(compare=("sft", "vote_rl", "vote_dpo")))
  # Self-generated data (LMSI §3.3; lmsi_jax/selfgen.py).
  c.selfgen = ml_collections.ConfigDict(dict(
      questions=False,          # each round the model writes new pool questions
      num_questions=64,         # prompts per round (one candidate question each)
      prompt_questions=4,       # real questions per prompt, in random order
      seed_questions=10,        # ... drawn from the first this many pool questions
      max_question_tokens=64,   # decode budget of one question
      min_vote_share=0.8,       # keep a candidate whose SC vote share is at least this
      exemplars=False,          # greedy zero-shot CoT answers become the few-shot exemplars
      num_exemplars=4))

  # Collapse guard (lmsi_jax/guard.py): label-free signals on a held-out unlabeled probe
  # (the pool's last probe_n questions) after stage 0 and each round; a round whose majority
  # answers agree with the previous model's less often than the previous model's own two
  # halves of samples agree with each other (minus max_drop) stops the rounds, and the last
  # unflagged round is kept. probe_n=0: off.
  c.guard = ml_collections.ConfigDict(dict(probe_n=0, max_drop=0.05))

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=32, temperature=1.2, base_temperature=0.7, top_k=40, top_p=1.0,
      max_decode_steps=256, calibration_bins=5, oracle=False, control=False,
      spurious=False))          # arm: LMSI's samples, a random non-majority answer's paths

  # mode="w2s" (lmsi_jax/w2s.py): the model above, trained on the seed data (base_train),
  # is the teacher; its labels for the pool train a student of another size.
  # Student bigger: weak-to-strong; smaller: distillation (LMSI Table 7).
  c.w2s = ml_collections.ConfigDict(dict(
      student_preset="small",   # a lmsi_jax.model.PRESETS name; ignored when student_checkpoint is set
      student_checkpoint="",    # like model.checkpoint, for the student
      pretrain_steps=0,         # student stage 0 on the easy seed data (base_train recipe); 0 = none
      labels="vote",            # teacher labels for the pool: "vote" (majority paths) | "greedy"
      losses=("xent",),         # student losses ("xent" | "confidence"); the first gives w2s_acc, pgr
      replay_weight=0.0,        # share of the student's pretraining data in its fine-tuning mixture
      conf_alpha_max=0.5,       # confidence loss (lmsi_jax/losses.py): weight of the student's
      conf_warmup_frac=0.2,     # hardened predictions, ramped up over this fraction of the steps,
      conf_threshold=0.0))      # on tokens where its max probability is at least this

  # Weights & Biases beside TensorBoard (lmsi_jax/wandb_logger.py): off while project is "".
  # The training scalars, each round's summary and a table of its sampled paths, votes and
  # kept paths (the first table_questions questions; 0 = no table).
  c.logging = ml_collections.ConfigDict(dict(wandb=ml_collections.ConfigDict(dict(
      project="", entity="", name="", mode="online", dir="", table_questions=8))))
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """One-line ValueErrors naming the key, before any work starts."""
  def check(ok, key, msg):
    if not ok:
      raise ValueError(f"config.{key}={_get(c, key)!r}: {msg}")
  check(c.mode in modes.MODES, "mode", f"expected one of {sorted(modes.MODES)}")
  check(c.compile_cache.min_compile_time_secs >= 0, "compile_cache.min_compile_time_secs",
        "must be >= 0")
  check(c.task.name in ("synthetic", "gsm8k"), "task.name", "expected 'synthetic' or 'gsm8k'")
  check(c.task.answer_type in voting.ANSWER_TYPES, "task.answer_type",
        f"expected one of {voting.ANSWER_TYPES}")
  check(c.task.extractor in extractors.EXTRACTORS, "task.extractor",
        f"expected one of {tuple(extractors.EXTRACTORS)}")
  check(c.task.extractor not in extractors.NUMBER_ONLY or c.task.answer_type == "number",
        "task.extractor", f"reads number answers only; task.answer_type={c.task.answer_type!r}")
  check(extractors.available(c.task.extractor), "task.extractor",
        "needs the math-verify package (pip install math-verify)")
  check(c.task.extractor == "lmsi" or not c.voting.fallback_last_number, "task.extractor",
        "voting.fallback_last_number=True applies to task.extractor='lmsi' only")
  check(len(c.formats) > 0 and all(f in formats_lib.FORMATS for f in c.formats), "formats",
        f"each must be one of {formats_lib.FORMATS}")
  check(c.prompt_format in formats_lib.FORMATS, "prompt_format",
        f"expected one of {formats_lib.FORMATS}")
  check(c.base_train.checkpoint_every >= 0, "base_train.checkpoint_every",
        "must be >= 0 (0 = train.checkpoint_every)")
  check(c.sampling.num_samples >= 1, "sampling.num_samples", "must be >= 1")
  check(c.sampling.temperature >= 0, "sampling.temperature", "must be >= 0")
  check(0 < c.sampling.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
  check(c.sampling.max_decode_steps >= 1, "sampling.max_decode_steps", "must be >= 1")
  check(c.sampling.questions_per_shard >= 1, "sampling.questions_per_shard", "must be >= 1")
  check(0 <= c.voting.min_vote_share <= 1, "voting.min_vote_share", "must be in [0, 1]")
  check(c.voting.max_paths >= 0, "voting.max_paths", "must be >= 0 (0 = no cap)")
  check(c.rounds.num_rounds >= 0, "rounds.num_rounds", "must be >= 0")
  check(c.rounds.init in ("continue", "restart"), "rounds.init", "expected 'continue' or 'restart'")
  check(c.rounds.early_stop_patience >= 0, "rounds.early_stop_patience", "must be >= 0 (0 = off)")
  _validate_learners(c, check)
  g = c.selfgen
  check(g.num_questions >= 1, "selfgen.num_questions", "must be >= 1")
  check(g.prompt_questions >= 1, "selfgen.prompt_questions", "must be >= 1")
  check(g.seed_questions >= 1, "selfgen.seed_questions", "must be >= 1")
  check(g.max_question_tokens >= 1, "selfgen.max_question_tokens", "must be >= 1")
  check(0 <= g.min_vote_share <= 1, "selfgen.min_vote_share", "must be in [0, 1]")
  check(g.num_exemplars >= 1, "selfgen.num_exemplars", "must be >= 1")
  few_shot = [f for f in c.formats if f in formats_lib.FEW_SHOT_FORMATS]
  if c.task.name == "synthetic" and not c.synthetic.num_exemplars:
    check(not few_shot, "synthetic.num_exemplars",
          f"formats {few_shot} need exemplars (the seed data uses them): set it > 0")
    check(c.prompt_format not in formats_lib.FEW_SHOT_FORMATS or g.exemplars,
          "synthetic.num_exemplars", f"prompt_format={c.prompt_format!r} needs exemplars: set it "
          "> 0 or selfgen.exemplars=True")
  check(c.sampling.top_k >= 0, "sampling.top_k", "must be >= 0 (0 = off)")
  check(c.sampling.batch_size >= 1, "sampling.batch_size", "must be >= 1")
  e = c.eval
  check(e.num_samples >= 1, "eval.num_samples", "must be >= 1")
  check(e.temperature >= 0, "eval.temperature", "must be >= 0")
  check(e.base_temperature >= 0, "eval.base_temperature", "must be >= 0")
  check(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1]")
  check(e.top_k >= 0, "eval.top_k", "must be >= 0 (0 = off)")
  check(e.max_decode_steps >= 1, "eval.max_decode_steps", "must be >= 1")
  check(e.calibration_bins >= 1, "eval.calibration_bins", "must be >= 1")
  check(c.train.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
  check(c.train.batch_size >= 1, "train.batch_size", "must be >= 1")
  check(c.base_train.batch_size >= 1, "base_train.batch_size", "must be >= 1")
  check(c.train.data_shards >= 0, "train.data_shards", "must be >= 0 (0 = one per process)")
  from lmsi_jax import optim  # pylint: disable=g-import-not-at-top
  optim.train_config(c)         # every train.* value, named by its own key
  from lmsi_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  try:
    lora_lib.LoraConfig.from_config(c.train.get("lora"))
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if c.base_train.enabled:
    check(c.base_train.num_steps >= 1, "base_train.num_steps", "must be >= 1 when enabled")
    optim.train_config(c, base=True)
  _validate_w2s(c, check)
  from lmsi_jax import guard as guard_lib  # pylint: disable=g-import-not-at-top
  try:      # the guard checks its own settings (one line naming the key)
    guard_lib.GuardSettings.from_config(c.guard)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  check(not (c.eval.spurious and c.mode == "w2s"), "eval.spurious", "is an LMSI-mode arm")
  from lmsi_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  check(bool(c.model.checkpoint) or c.model.preset in model_lib.PRESETS, "model.checkpoint",
        f"set it to a HF directory or .gguf file (or model.preset to one of {sorted(model_lib.PRESETS)})")
  check(c.model.init in ("",) + model_lib.INITS, "model.init",
        f"expected '' (the preset's) or one of {list(model_lib.INITS)}")
  from lmsi_jax import wandb_logger  # pylint: disable=g-import-not-at-top
  wandb_logger.validate(c, check)
  check(c.data.source in ("jsonl", "tfds"), "data.source", "expected 'jsonl' or 'tfds'")
  check(c.data.on_error in ("raise", "skip"), "data.on_error", "expected 'raise' or 'skip'")
  if c.task.name == "gsm8k" and c.data.source == "jsonl":
    check(bool(c.data.dir), "data.dir", "set it to a directory with train.jsonl and test.jsonl")


def _validate_learners(c, check) -> None:
  from lmsi_jax import learners  # pylint: disable=g-import-not-at-top
  check(c.rounds.learner in learners.LEARNERS, "rounds.learner",
        f"expected one of {learners.LEARNERS}")
  names = tuple(c.learners.compare)
  check(len(names) > 0 and len(set(names)) == len(names)
        and all(n in learners.LEARNERS for n in names), "learners.compare",
        f"a non-empty tuple of distinct names from {learners.LEARNERS}")
  rl = c.rounds.learner != "sft" or (c.mode == "learners" and set(names) != {"sft"})
  if rl:
    check(not c.train.lora.rank, "train.lora.rank", "vote_rl and vote_dpo train every weight: "
          "set it to 0")
  if c.rounds.learner != "sft":
    check(not c.eval.spurious, "eval.spurious", f"is an arm of the sft learner's pseudo-labels "
          f"(rounds.learner={c.rounds.learner!r})")
  if c.rounds.learner == "vote_rl":
    check(not c.selfgen.questions, "selfgen.questions", "vote_rl samples the pool only")
  try:
    learners.check_config(c)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None


def _validate_w2s(c, check) -> None:
  from lmsi_jax import losses as losses_lib  # pylint: disable=g-import-not-at-top
  from lmsi_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  w = c.w2s
  check(bool(w.student_checkpoint) or w.student_preset in model_lib.PRESETS, "w2s.student_preset",
        f"expected one of {sorted(model_lib.PRESETS)} (or set w2s.student_checkpoint)")
  check(w.labels in ("vote", "greedy"), "w2s.labels", "expected 'vote' or 'greedy'")
  check(len(w.losses) > 0 and len(set(w.losses)) == len(w.losses)
        and all(x in losses_lib.LOSSES for x in w.losses), "w2s.losses",
        f"a non-empty tuple of distinct names from {losses_lib.LOSSES}")
  check(w.pretrain_steps >= 0, "w2s.pretrain_steps", "must be >= 0 (0 = no student pretraining)")
  check(0 <= w.replay_weight < 1, "w2s.replay_weight", "must be in [0, 1)")
  try:      # the loss checks its own settings; the error gains the "config." prefix here
    losses_lib.ConfidenceLoss(alpha_max=w.conf_alpha_max, warmup_frac=w.conf_warmup_frac,
                              threshold=w.conf_threshold)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if c.mode == "w2s" and c.task.name != "synthetic":   # only the built-in task has easy seed data
    check(w.pretrain_steps == 0, "w2s.pretrain_steps", "student pretraining needs task.name='synthetic'")
    check(w.replay_weight == 0, "w2s.replay_weight", "replay needs task.name='synthetic'")


def _get(c, dotted):
  for k in dotted.split("."):
    c = c[k]
  return c


def load_config_file(path: str, variant: str | None = None,
                     overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`path`'s `get_config(variant)` plus dotted overrides, without absl flags (notebooks, tests).

  `overrides` maps "a.b" keys to values, as `--config.a.b=value` does on the command line;
  an unknown key raises KeyError naming it, a wrongly typed value the locked ConfigDict's error.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such config file")
  name = "lmsi_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  for key, value in (overrides or {}).items():
    *groups, leaf = key.split(".")
    node = c
    for i, g in enumerate(groups):
      if g not in node:
        raise KeyError(f"{path}: unknown config key {'.'.join(groups[:i + 1])!r} in {key!r}")
      node = node[g]
    if leaf not in node:
      raise KeyError(f"{path}: unknown config key {key!r}")
    node[leaf] = value
  return c
