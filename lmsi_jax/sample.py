"""Sample continuations from a checkpoint.

  python -m lmsi_jax.sample --checkpoint /path/model.gguf --prompt "Q: 2+3=? A:" \
      --max_decode_steps 64 --temperature 0.7 --num_samples 4
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lmsi_jax import sampler
from lmsi_jax import sharding
from lmsi_jax.checkpoints import load_checkpoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="HF checkpoint directory or .gguf file")
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


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  try:
    shape = tuple(int(s) for s in args.mesh_shape.split(","))
  except ValueError:
    raise SystemExit(f"--mesh_shape={args.mesh_shape!r}: expected three integers like -1,1,1")
  mesh = sharding.make_mesh(shape)
  lm, vocab = load_checkpoint(args.checkpoint, mesh, dtype=args.dtype, max_seq_len=args.max_seq_len)
  results = sampler.generate(
      lm, vocab, args.prompt, num_samples=args.num_samples, temperature=args.temperature,
      top_k=args.top_k, top_p=args.top_p, max_decode_steps=args.max_decode_steps,
      stop_strings=tuple(args.stop), seed=args.seed,
      batch_size=max(args.num_samples * len(args.prompt), 1))
  for i, samples in enumerate(results):
    for j, s in enumerate(samples):
      print(f"=== prompt {i} sample {j} ({s.stop_reason}, {len(s.tokens)} tokens)")
      print(s.text)


if __name__ == "__main__":
  main()
