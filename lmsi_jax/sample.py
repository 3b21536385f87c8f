"""Sample continuations from a checkpoint.

  python -m lmsi_jax.sample --checkpoint /path/model.gguf --prompt "Q: 2+3=? A:" \
      --max_decode_steps 64 --temperature 0.7 --num_samples 4

`--checkpoint` takes a Hugging Face directory, a .gguf file or an lmsi_jax
training directory (e.g. WORKDIR/round_1/train). Prompts are tokenized as the
checkpoint's own tokenizer does (a BOS only where it adds one). Bad arguments
fail with one line before the model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True,
                 help="HF checkpoint directory, .gguf file or lmsi_jax training directory")
  p.add_argument("--prompt", required=True, action="append",
                 help="prompt text (repeat the flag for several prompts)")
  p.add_argument("--max_decode_steps", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
  p.add_argument("--num_samples", type=int, default=1)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--mesh_shape", default="-1,1,1", help="data,fsdp,model (one may be -1)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--max_seq_len", type=int, default=None)
  return p.parse_args(argv)


def _fail(msg: str) -> SystemExit:
  return SystemExit(f"lmsi_jax.sample: error: {msg}")


def check_args(args: argparse.Namespace) -> tuple[int, ...]:
  """Validates everything that does not need the model. Returns the mesh shape."""
  path = args.checkpoint
  if not os.path.exists(path):
    raise _fail(f"--checkpoint={path!r} does not exist")
  if not (os.path.isdir(path) or path.endswith(".gguf")):
    raise _fail(f"--checkpoint={path!r}: expected a Hugging Face directory, a .gguf file or an "
                "lmsi_jax training directory")
  try:
    shape = tuple(int(s) for s in args.mesh_shape.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise _fail(f"--mesh_shape={args.mesh_shape!r}: expected three positive integers like 2,2,2 "
                "(one may be -1)")
  if args.num_samples < 1:
    raise _fail(f"--num_samples must be >= 1, got {args.num_samples}")
  if args.max_seq_len is not None and args.max_seq_len < 2:
    raise _fail(f"--max_seq_len must be >= 2, got {args.max_seq_len}")
  from lmsi_jax import sampler  # pylint: disable=g-import-not-at-top
  try:
    sampler.SamplingParams(args.temperature, args.top_k, args.top_p, args.max_decode_steps)
  except ValueError as e:
    raise _fail(f"--{e}") from None
  return shape


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  shape = check_args(args)
  from lmsi_jax import loading, sampler, sharding  # pylint: disable=g-import-not-at-top
  try:
    mesh = sharding.make_mesh(shape)
  except ValueError as e:
    raise _fail(f"--mesh_shape={args.mesh_shape!r}: {e}") from None
  try:
    lm, vocab = loading.load_any(args.checkpoint, mesh, dtype=args.dtype,
                                   max_seq_len=args.max_seq_len)
    results = sampler.generate(
        lm, vocab, args.prompt, num_samples=args.num_samples, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, max_decode_steps=args.max_decode_steps,
        stop_strings=tuple(args.stop), seed=args.seed,
        batch_size=max(args.num_samples * len(args.prompt), 1))
  except (ValueError, FileNotFoundError) as e:
    raise _fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
  for i, samples in enumerate(results):
    for j, s in enumerate(samples):
      print(f"=== prompt {i} sample {j} ({s.stop_reason}, {len(s.tokens)} tokens)")
      print(s.text)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
