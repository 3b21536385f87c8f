"""LMSI on GSM8K with the paper's settings (Huang et al., §4 and App. A.1).

  python -m lmsi_jax.main --config=configs/gsm8k.py --workdir=DIR \
      --config.data.dir=/path/to/gsm8k --config.model.checkpoint=/path/to/hf_or.gguf

8-shot CoT exemplars (Wei et al.; shipped in lmsi_jax/prompts, override with
data.cot_exemplars / data.standard_exemplars), all four formats, m=32 paths
at T=0.7 (top-k 40), at most 256 decode steps, one round of fine-tuning for
10k steps at lr 5e-5 with batch 32, self-consistency evaluation at T=1.2
after LMSI (0.7 before). Data from a JSONL directory (train.jsonl,
test.jsonl) or TFDS (`--config.data.source=tfds`, downloads).

Without `model.checkpoint` the tiny byte-level preset is initialised at
random: that tests the wiring, not the method. `:smoke` runs a handful of
questions end to end on CPU in about a minute (zero-shot prompts, so the
byte-level model's context stays short). `:checkpoint:PATH` is the run on a real
checkpoint (configs/llama3.py, qwen3.py and gemma3.py are it by family): PATH required
(an empty one stops the run with one line), context capped at 2048 tokens, training
rematerialises each layer.
"""

from lmsi_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.task.update(name="gsm8k", answer_type="number", cue="The answer is", stop="\nQ:")
  c.data.update(source="jsonl", dir="", pool_split="train", eval_split="test", on_error="raise")
  c.prompt_format = "few_shot_cot"
  c.sampling.update(num_samples=32, temperature=0.7, top_k=40, top_p=1.0, max_decode_steps=256,
                    batch_size=64, questions_per_shard=64)
  c.train.update(optimizer="adamw", learning_rate=5e-5, schedule="constant", num_steps=10_000,
                 batch_size=32, seq_len=1536, checkpoint_every=1000)
  c.rounds.update(num_rounds=1, init="continue", pseudo_weight=1.0, seed_weight=0.0)
  c.eval.update(num_samples=32, temperature=1.2, base_temperature=0.7, top_k=40,
                max_decode_steps=256)
  if arg == "smoke":
    c.model.update(preset="tiny", max_seq_len=512)
    c.data.update(pool_limit=6, eval_limit=4)
    c.formats = ("zero_shot_cot", "zero_shot_direct")
    c.prompt_format = "zero_shot_cot"
    c.sampling.update(num_samples=3, max_decode_steps=24, batch_size=32, questions_per_shard=4)
    c.train.update(num_steps=4, batch_size=8, seq_len=512, log_every=2, checkpoint_every=2,
                   learning_rate=1e-3)
    c.eval.update(num_samples=3, max_decode_steps=24)
  elif arg and arg.startswith("checkpoint:"):
    c.model.preset = ""                 # no random-init fallback: a checkpoint is required
    c.model.checkpoint = arg[len("checkpoint:"):]
    c.model.max_seq_len = 2048
    c.train.seq_len = 1536
    c.train.remat = "full"
  elif arg:
    raise ValueError(f"configs/gsm8k.py: unknown variant {arg!r} (known: smoke, checkpoint:PATH)")
  return c
