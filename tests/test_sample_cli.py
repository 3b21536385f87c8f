"""The sampling CLI: argument errors before loading, lmsi_jax training directories as checkpoints."""
import dataclasses
import json
import os
import sys

import pytest

from lmsi_jax import checkpoint as ckpt_lib
from lmsi_jax import model as model_lib
from lmsi_jax import loading
from lmsi_jax import sample as sample_cli
from lmsi_jax import sampler
from lmsi_jax.interop import load_checkpoint
from lmsi_jax.data import vocab as vocab_lib

sys.path.insert(0, os.path.dirname(__file__))
from test_gguf import write_tiny_gguf  # noqa: E402  pylint: disable=g-import-not-at-top


def _training_dir(path, lm, source: str) -> str:
  """What lmsi_jax.train leaves in WORKDIR/round_k/train: checkpoints/<step> with params + meta."""
  cfg = {"model": {"checkpoint": source, "preset": "tiny"}}
  with ckpt_lib.Checkpointer(os.path.join(path, ckpt_lib.CHECKPOINT_SUBDIR), async_save=False) as c:
    c.save(3, lm.state, meta={"config": json.dumps(cfg),
                              "model_config": dataclasses.asdict(lm.cfg), "step": 3})
  return str(path)


def _cli(argv, capsys):
  sample_cli.main(argv)
  return capsys.readouterr().out


ARGS = ["--prompt", "the", "--prompt", "in", "--temperature", "0", "--max_decode_steps", "4",
        "--num_samples", "2", "--mesh_shape", "2,2,2"]


def test_training_directory_as_checkpoint(tmp_path, mesh8, capsys):
  """README's `--checkpoint DIR/round_1/train`: the params it saved, the tokenizer it was trained with."""
  gguf_path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(gguf_path)
  lm, vocab = load_checkpoint(gguf_path, mesh8)
  train_dir = _training_dir(tmp_path / "round_1" / "train", lm, gguf_path)
  lm2, vocab2 = loading.load_any(train_dir, mesh8)
  assert vocab2 == vocab and lm2.cfg == lm.cfg           # the GGUF's tokenizer, not the byte one
  direct = _cli(["--checkpoint", gguf_path] + ARGS, capsys)
  assert direct.count("=== prompt") == 4
  assert _cli(["--checkpoint", train_dir] + ARGS, capsys) == direct
  assert _cli(["--checkpoint", os.path.join(train_dir, "checkpoints")] + ARGS, capsys) == direct

  # A run started from a preset: the byte vocabulary.
  tiny = model_lib.LM.init(model_lib.preset("tiny"), mesh8, seed=0)
  byte_dir = _training_dir(tmp_path / "preset" / "train", tiny, "")
  out = _cli(["--checkpoint", byte_dir, "--prompt", "Q: 1+2\nA:", "--temperature", "0",
              "--mesh_shape", "2,2,2", "--max_decode_steps", "3"], capsys)
  ref = sampler.generate(tiny, vocab_lib.byte_vocabulary(), ["Q: 1+2\nA:"], temperature=0.0,
                         max_decode_steps=3, stop_strings=(), batch_size=1)[0][0]
  assert out == f"=== prompt 0 sample 0 ({ref.stop_reason}, {len(ref.tokens)} tokens)\n{ref.text}\n"

  # Its source checkpoint gone: one line naming it.
  os.remove(gguf_path)
  with pytest.raises(SystemExit, match=r"^lmsi_jax.sample: error: .*tiny.gguf, which no longer exists"):
    sample_cli.main(["--checkpoint", train_dir] + ARGS)


@pytest.mark.parametrize("extra, msg", [
    (["--checkpoint", "/nope/model.gguf"], "does not exist"),
    (["--checkpoint", "FILE"], "expected a Hugging Face directory, a .gguf file or an lmsi_jax"),
    (["--mesh_shape", "2,2"], "--mesh_shape='2,2': expected three positive integers"),
    (["--mesh_shape", "a,b,c"], "expected three positive integers"),
    (["--mesh_shape", "3,1,1"], "--mesh_shape='3,1,1': "),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top_p", "0"], "--top_p must be in"),
    (["--top_k", "-2"], "--top_k must be an int >= 0"),
    (["--max_decode_steps", "0"], "--max_decode_steps must be an int >= 1"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
    (["--max_seq_len", "1"], "--max_seq_len must be >= 2"),
])
def test_bad_arguments_fail_with_one_line_before_loading(tmp_path, monkeypatch, extra, msg):
  def no_load(*a, **k):
    raise AssertionError("the model was loaded before the arguments were checked")
  monkeypatch.setattr(loading, "load_any", no_load)
  d = tmp_path / "ckpt"
  d.mkdir()
  (tmp_path / "model.bin").write_bytes(b"x")
  argv = ["--checkpoint", str(d), "--prompt", "hi"] + [
      str(tmp_path / "model.bin") if a == "FILE" else a for a in extra]
  with pytest.raises(SystemExit) as e:
    sample_cli.main(argv)
  text = str(e.value.code)
  assert text.startswith("lmsi_jax.sample: error: ") and msg in text and "\n" not in text


def test_load_errors_are_one_line(tmp_path, capsys):
  d = tmp_path / "empty"
  d.mkdir()          # neither config.json nor an Orbax checkpoint
  with pytest.raises(SystemExit, match=r"^lmsi_jax.sample: error: .*empty: not a Hugging Face "
                                       r"directory \(no config.json\) and not an lmsi_jax"):
    sample_cli.main(["--checkpoint", str(d), "--prompt", "hi", "--mesh_shape", "2,2,2"])
  gguf_path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(gguf_path)
  with pytest.raises(SystemExit, match=r"^lmsi_jax.sample: error: prompt 0 has \d+ tokens; with "
                                       r"max_decode_steps=200 it exceeds"):
    sample_cli.main(["--checkpoint", gguf_path, "--prompt", "the", "--max_decode_steps", "200",
                     "--mesh_shape", "2,2,2"])


def test_empty_prompt_without_a_start_token(tmp_path, mesh8):
  """A tokenizer that adds no BOS gives an empty prompt no token: it starts from the BOS token
  (as transformers' generate() without input ids), or fails with one line when there is none."""
  path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(path)                       # gpt2 tokenizer, bos_token_id 0, no add_bos_token
  lm, vocab = load_checkpoint(path, mesh8)
  assert vocab_lib.prompt_prefix(vocab) == () and vocab.bos_id == 0
  assert vocab_lib.encode_prompt(vocab, "") == [] and list(vocab.encode("!")) == [0]
  kw = dict(temperature=0.0, max_decode_steps=3, stop_strings=(), batch_size=2)
  empty, bang = sampler.generate(lm, vocab, ["", "!"], **kw)
  assert empty[0].tokens == bang[0].tokens
  no_bos = vocab_lib.HFTokenizersVocabulary(vocab.tokenizer, eos=vocab.eos_id)
  with pytest.raises(ValueError, match=r"^prompt 1 is empty and the tokenizer has no BOS token"):
    sampler.generate(lm, no_bos, ["the", ""], **kw)
