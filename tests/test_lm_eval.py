"""lm-evaluation-harness adapter: the harness runs our sampler and scorer on a local GSM8K task."""
import dataclasses
import glob
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

# The local task's JSONL needs no hub: never let datasets/huggingface_hub try the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lmsi_jax import model as model_lib  # noqa: E402
from lmsi_jax import sampler  # noqa: E402
from lmsi_jax.data import vocab as vocab_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_GSM8K = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "gsm8k", "test.jsonl"))
INLINE_ROWS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
     "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?",
     "answer": "4 * 3 = <<4*3=12>>12\n#### 12"},
    {"question": "Sara had 10 dollars and spent 7. How many dollars are left?",
     "answer": "10 - 7 = <<10-7=3>>3\n#### 3"},
]
GEN_TASK = "gsm8k_lmsi_local"
LL_TASK = "gsm8k_lmsi_local_ll"
ROLL_TASK = "gsm8k_lmsi_local_rolling"
PROMPT = "Question: {{question}}\nAnswer:"


def gsm8k_rows(n: int) -> list[dict]:
  """The first n rows of ../shared's GSM8K test split, or inline rows without it."""
  if not os.path.exists(SHARED_GSM8K):
    return INLINE_ROWS[:n]
  with open(SHARED_GSM8K, encoding="utf-8") as f:
    return [json.loads(next(f)) for _ in range(n)]


def write_tasks(path, rows, *, max_gen_toks: int, num_fewshot: int = 0) -> None:
  """lm_eval task YAMLs over a local JSONL (dataset_path: json): gsm8k.yaml's generate task
  (its metric and filters), a loglikelihood task on the final answer and a rolling one."""
  data = path / "test.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  common = (f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\nfewshot_split: test\nnum_fewshot: {num_fewshot}\n"
            f"metadata:\n  version: 1.0\n")
  (path / f"{GEN_TASK}.yaml").write_text(
      f"task: {GEN_TASK}\n" + common + f"""output_type: generate_until
doc_to_text: {json.dumps(PROMPT)}
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
""", encoding="utf-8")
  (path / f"{LL_TASK}.yaml").write_text(
      f"task: {LL_TASK}\n" + common + f"""output_type: loglikelihood
doc_to_text: {json.dumps(PROMPT)}
doc_to_target: " {{{{answer.split('#### ')[-1]}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
""", encoding="utf-8")
  (path / f"{ROLL_TASK}.yaml").write_text(
      f"task: {ROLL_TASK}\n" + common.replace(f"num_fewshot: {num_fewshot}", "num_fewshot: 0") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""", encoding="utf-8")


def evaluate(model, tmp_path, tasks, **kw):
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  return lm_eval.simple_evaluate(model=model, tasks=tasks,
                                 task_manager=TaskManager(include_path=str(tmp_path)),
                                 log_samples=True, bootstrap_iters=0, **kw)


def direct_loglikelihood(lm, vocab, context: str, continuation: str) -> tuple[float, bool]:
  """Unpadded full forward: sum of the continuation's log-softmax, all-argmax."""
  whole = vocab_lib.encode_prompt(vocab, context + continuation)
  n = len(whole) - len(vocab_lib.encode_prompt(vocab, context))
  toks = jnp.asarray(whole[:-1], jnp.int32)[None]
  logits, _ = lm(toks, jnp.arange(toks.shape[1])[None], model_lib.causal_mask(toks.shape[1]))
  logits = np.asarray(logits[0], np.float64)[:, :vocab.vocab_size]
  lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tgt = np.asarray(whole[1:])
  pos = np.arange(len(tgt))[-n:]
  return float(lp[pos, tgt[-n:]].sum()), bool((logits[pos].argmax(-1) == tgt[-n:]).all())


@pytest.fixture(scope="module")
def tiny(mesh8):
  return model_lib.LM.init(model_lib.preset("tiny"), mesh8, seed=0), vocab_lib.byte_vocabulary()


def test_package_imports_without_lm_eval(monkeypatch):
  """lm_eval is optional: lmsi_jax imports without it; the adapter says what to install."""
  out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['lm_eval'] = None\n"
                        "import lmsi_jax, lmsi_jax.sample, lmsi_jax.loading\n"
                        "assert 'lmsi_jax.lm_eval_model' not in sys.modules"],
                       capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
  assert out.returncode == 0, out.stderr
  monkeypatch.setitem(sys.modules, "lm_eval", None)
  monkeypatch.delitem(sys.modules, "lmsi_jax.lm_eval_model", raising=False)
  with pytest.raises(ImportError, match="pip install lm-eval"):
    importlib.import_module("lmsi_jax.lm_eval_model")


def test_registered_and_model_args_validated(tiny):
  from lmsi_jax import lm_eval_model  # pylint: disable=g-import-not-at-top
  from lm_eval.api.registry import get_model  # pylint: disable=g-import-not-at-top
  assert get_model("lmsi_jax") is lm_eval_model.LmsiJaxLM
  assert get_model("hf") is not None                  # the harness's own models still resolve
  lm, vocab = tiny
  with pytest.raises(ValueError, match=r"^lmsi_jax model_args: unknown key 'pretrained'"):
    lm_eval_model.LmsiJaxLM.create_from_arg_string("pretrained=gpt2")
  with pytest.raises(ValueError, match=r"'batch_size' is set by the harness .*leave it out"):
    lm_eval_model.LmsiJaxLM.create_from_arg_string("checkpoint=x,batch_size=8", {"batch_size": 1})
  with pytest.raises(ValueError, match="exactly one of checkpoint"):
    lm_eval_model.LmsiJaxLM()
  with pytest.raises(ValueError, match=r"mesh_shape='2,2': expected three integers"):
    lm_eval_model.parse_mesh_shape("2,2")
  assert lm_eval_model.parse_mesh_shape("2x2x2") == (2, 2, 2)
  m = lm_eval_model.LmsiJaxLM(lm=lm, vocab=vocab, batch_size=8)
  with pytest.raises(ValueError, match="unsupported gen_kwargs key 'num_beams'"):
    m._sampling({"until": ["Q:"], "num_beams": 4})  # pylint: disable=protected-access
  params, until = m._sampling({"until": "Q:", "do_sample": True, "temperature": 0.5,  # pylint: disable=protected-access
                               "max_new_tokens": 7, "top_k": 3})
  assert params == sampler.SamplingParams(0.5, 3, 1.0, 7) and until == ["Q:"]


def test_local_gsm8k_task_runs_our_sampler_and_scorer(tiny, tmp_path):
  """The harness's generate_until is our greedy sampler; loglikelihood(_rolling) is the
  model's log-softmax; the task's metrics are consistent with the per-sample responses."""
  from lmsi_jax import lm_eval_model  # pylint: disable=g-import-not-at-top
  lm, vocab = tiny
  rows = gsm8k_rows(3)
  write_tasks(tmp_path, rows, max_gen_toks=12)
  model = lm_eval_model.LmsiJaxLM(lm=lm, vocab=vocab, batch_size=8)
  out = evaluate(model, tmp_path, [GEN_TASK, LL_TASK, ROLL_TASK])
  assert model.calls == {"generate_until": 3, "loglikelihood": 3, "loglikelihood_rolling": 3}
  res, samples = out["results"], out["samples"]

  # generate_until == lmsi_jax.sampler.generate, greedy, same stop strings and budget.
  prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
  ref = sampler.generate(lm, vocab, prompts, temperature=0.0, max_decode_steps=12,
                         stop_strings=("Question:", "\n\n"), batch_size=8)
  by_doc = {s["doc_id"]: s for s in samples[GEN_TASK]}
  for i, r in enumerate(ref):
    assert by_doc[i]["arguments"][0][0] == prompts[i]
    assert by_doc[i]["resps"][0][0] == r[0].text
  for f in ("strict-match", "flexible-extract"):
    scores = [s["exact_match"] for s in samples[GEN_TASK] if s["filter"] == f]
    assert res[GEN_TASK][f"exact_match,{f}"] == pytest.approx(np.mean(scores))

  # loglikelihood == a direct unpadded forward; the task's metrics aggregate it.
  lls = []
  for s in sorted(samples[LL_TASK], key=lambda s: s["doc_id"]):
    (ctx, cont), = s["arguments"]
    got_lp, got_greedy = s["resps"][0][0]
    lp, greedy = direct_loglikelihood(lm, vocab, ctx, cont)
    assert got_lp == pytest.approx(lp, rel=1e-4, abs=1e-3) and got_greedy == greedy
    assert cont == " " + rows[s["doc_id"]]["answer"].split("#### ")[-1]
    lls.append(got_lp)
  assert res[LL_TASK]["perplexity,none"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)
  assert 0.0 <= res[LL_TASK]["acc,none"] <= 1.0

  # loglikelihood_rolling: the whole question after the prefix token (byte vocabulary: id 0).
  for s in samples[ROLL_TASK]:
    q = rows[s["doc_id"]]["question"]
    ids = vocab.encode(q)
    toks = jnp.asarray([0] + list(ids[:-1]), jnp.int32)[None]
    logits, _ = lm(toks, jnp.arange(toks.shape[1])[None], model_lib.causal_mask(toks.shape[1]))
    lp = jax.nn.log_softmax(jnp.where(jnp.arange(logits.shape[-1]) < vocab.vocab_size, logits,
                                      -jnp.inf), -1)[0]
    want = float(jnp.take_along_axis(lp, jnp.asarray(ids)[:, None], -1).sum())
    assert s["resps"][0][0] == pytest.approx(want, rel=1e-4, abs=1e-3)
  assert res[ROLL_TASK]["bits_per_byte,none"] > 0


@pytest.mark.slow
def test_smollm2_gguf_through_model_args(smollm2_gguf, tmp_path):
  """The real SmolLM2-135M-Instruct GGUF by `--model lmsi_jax --model_args checkpoint=...`:
  two GSM8K questions, greedy 16-token answers equal to our sampler's, answer log-likelihoods
  equal to a direct forward."""
  from lm_eval.api.registry import get_model  # pylint: disable=g-import-not-at-top
  import lmsi_jax.lm_eval_model  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  if os.environ.get("CI") == "true":
    pytest.skip("SmolLM2 through lm_eval: ~1 min on 2 CPU cores; skipped under CI=true")
  rows = gsm8k_rows(2)
  write_tasks(tmp_path, rows, max_gen_toks=16)
  model = get_model("lmsi_jax").create_from_arg_string(
      f"checkpoint={smollm2_gguf},mesh_shape=-1x1x1,max_seq_len=512", {"batch_size": 8})
  out = evaluate(model, tmp_path, [GEN_TASK, LL_TASK])
  lm, vocab = model.lm, model.vocab
  prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
  ref = sampler.generate(lm, vocab, prompts, temperature=0.0, max_decode_steps=16,
                         stop_strings=("Question:", "\n\n"), batch_size=8)
  gen = {s["doc_id"]: s["resps"][0][0] for s in out["samples"][GEN_TASK]}
  assert [gen[i] for i in range(len(rows))] == [r[0].text for r in ref]
  assert any(t.strip() for t in gen.values())
  for s in out["samples"][LL_TASK]:
    (ctx, cont), = s["arguments"]
    lp, greedy = direct_loglikelihood(lm, vocab, ctx, cont)
    assert s["resps"][0][0][0] == pytest.approx(lp, rel=1e-3, abs=1e-2)
    assert s["resps"][0][0][1] == greedy
    assert lp < 0
  assert set(out["results"][GEN_TASK]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
  assert out["results"][LL_TASK]["perplexity,none"] > 1.0


@pytest.mark.slow
def test_command_line_with_a_training_directory(tmp_path, mesh8):
  """README's command: `python -m lmsi_jax.lm_eval_model --model lmsi_jax --model_args
  checkpoint=DIR/round_1/train,...` (lm_eval's own CLI, the model registered first)."""
  from lmsi_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from lmsi_jax import loading  # pylint: disable=g-import-not-at-top
  tiny = model_lib.LM.init(model_lib.preset("tiny"), mesh8, seed=3)
  train_dir = tmp_path / "round_1" / "train"
  with ckpt_lib.Checkpointer(str(train_dir / ckpt_lib.CHECKPOINT_SUBDIR), async_save=False) as c:
    c.save(2, tiny.state, meta={"config": json.dumps({"model": {"checkpoint": ""}}),
                                "model_config": dataclasses.asdict(tiny.cfg), "step": 2})
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  rows = gsm8k_rows(2)
  write_tasks(tasks, rows, max_gen_toks=8)
  out = subprocess.run(
      [sys.executable, "-m", "lmsi_jax.lm_eval_model", "--model", "lmsi_jax", "--model_args",
       f"checkpoint={train_dir},mesh_shape=-1x1x1", "--batch_size", "8", "--tasks", GEN_TASK,
       "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples"],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  (res_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  with open(res_file) as f:
    res = json.load(f)
  assert res["config"]["model"] == "lmsi_jax"
  assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(res["results"][GEN_TASK])
  (samples_file,) = glob.glob(str(tmp_path / "out" / "**" / f"samples_{GEN_TASK}_*.jsonl"),
                              recursive=True)
  with open(samples_file) as f:
    got = {s["doc_id"]: s["resps"][0][0] for s in map(json.loads, f) if s["filter"] == "strict-match"}
  lm, vocab = loading.load_any(str(train_dir), mesh8)
  ref = sampler.generate(lm, vocab, [f"Question: {r['question']}\nAnswer:" for r in rows],
                         temperature=0.0, max_decode_steps=8, stop_strings=("Question:", "\n\n"),
                         batch_size=8)
  assert [got[i] for i in range(len(rows))] == [r[0].text for r in ref]
