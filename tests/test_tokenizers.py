"""Tokenizers from checkpoints: GGUF metadata and tokenizer.json vs transformers, byte twin, SentencePiece."""
import io
import json
import os

import gguf
import numpy as np
import pytest
import seqio

from lmsi_jax.interop import load_tokenizer, save_tokenizer
from lmsi_jax.interop import tokenizer as tok_lib
from lmsi_jax.data import vocab as vocab_lib

STRINGS = ["  leading", "tabs\t\t", "emoji 🙂", "中文", "\n\nQ:", "café", "numbers 1,234.50",
           "Q: Natalia sold 48/2 = 24 clips.\nA: The answer is 72.", "trailing   ", " ",
           "don't I'LL we've", "<|im_start|>user\nhi<|im_end|>", "x\u00a0y\r\nz", "🙂🙂 ∑∫ é"]


@pytest.fixture(scope="module")
def smol_tokenizers(smollm2_gguf):
  """(our vocabulary from the GGUF, transformers' tokenizer from the same GGUF)."""
  path = smollm2_gguf
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  return load_tokenizer(path), ref


def _assert_parity(vocab, ref):
  for s in STRINGS:
    ids = ref(s, add_special_tokens=False)["input_ids"]
    assert list(vocab.encode(s)) == ids, s
    assert vocab.tokenizer.decode(ids, skip_special_tokens=False) == ref.decode(ids), s
    # Prompts: the tokenizer's own ids, its BOS only where it adds one.
    assert vocab_lib.encode_prompt(vocab, s) == ref(s)["input_ids"], s


@pytest.mark.reference
def test_gguf_tokenizer_matches_transformers(smol_tokenizers):
  vocab, ref = smol_tokenizers
  assert isinstance(vocab, vocab_lib.HFTokenizersVocabulary)
  # SmolLM2's GGUF says add_bos_token=False: its BOS (<|im_start|>) is never prepended.
  assert (vocab.vocab_size, vocab.bos_id, vocab.eos_id) == (len(ref), 1, 2)
  assert vocab.eos_id == ref.eos_token_id and vocab.bos_id == ref.bos_token_id
  assert vocab_lib.prompt_prefix(vocab) == ()
  prompt = "Q: A farmer has 12 cows and buys 7 more. How many cows does he have?\nA:"
  assert vocab_lib.encode_prompt(vocab, prompt) == ref(prompt)["input_ids"]
  assert vocab_lib.encode_prompt(vocab, prompt)[0] == vocab.encode("Q")[0]
  _assert_parity(vocab, ref)
  assert vocab.decode(vocab.encode("café 🙂") + [vocab.eos_id, 5]) == "café 🙂"


@pytest.mark.reference
def test_tokenizer_json_matches_transformers(smol_tokenizers, tmp_path):
  transformers = pytest.importorskip("transformers")
  _, gguf_ref = smol_tokenizers
  gguf_ref.save_pretrained(str(tmp_path))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  vocab = load_tokenizer(str(tmp_path))               # tokenizer.json + tokenizer_config.json
  assert isinstance(vocab, vocab_lib.HFTokenizersVocabulary)
  assert (vocab.bos_id, vocab.eos_id) == (ref.bos_token_id, ref.eos_token_id)
  assert vocab_lib.prompt_prefix(vocab) == ()
  _assert_parity(vocab, ref)
  # Re-export (our writer) and reload with transformers.
  out = tmp_path / "again"
  out.mkdir()
  save_tokenizer(vocab, str(out))
  again = transformers.AutoTokenizer.from_pretrained(str(out))
  assert again.eos_token == "<|im_end|>"
  _assert_parity(vocab, again)


def test_byte_twin_matches_byte_vocabulary(tmp_path):
  byte = vocab_lib.byte_vocabulary()
  twin = tok_lib.byte_tokenizer()
  assert twin.get_vocab_size() == byte.vocab_size == 259
  for s in STRINGS:
    assert twin.encode(s, add_special_tokens=False).ids == list(byte.encode(s)), s
    assert twin.decode(list(byte.encode(s))) == s
  save_tokenizer(byte, str(tmp_path))
  assert isinstance(load_tokenizer(str(tmp_path)), seqio.ByteVocabulary)
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert ref("tabs\t🙂", add_special_tokens=False)["input_ids"] == list(byte.encode("tabs\t🙂"))
  assert ref.eos_token_id == 1 and ref.pad_token_id == 0
  # The exported tokenizer starts texts with the byte vocabulary's start id 0, as prompts do.
  assert ref("tabs\t🙂")["input_ids"] == vocab_lib.encode_prompt(byte, "tabs\t🙂")


def _train_sentencepiece():
  spm = pytest.importorskip("sentencepiece")
  text = (["The quick brown fox jumps over the lazy dog. Q: what is 12 plus 30? A: 42."] * 40
          + ["café résumé naïve 中文 tabs\there  leading spaces and numbers 1,234.50"] * 20)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model, vocab_size=360, model_type="bpe",
      byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=model.getvalue()), model.getvalue()


def _write_sp_gguf(path, sp, add_bos=None):
  n = sp.get_piece_size()
  types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
           for i in range(n)]
  w = gguf.GGUFWriter(path, "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list([sp.id_to_piece(i) for i in range(n)])
  w.add_token_scores([sp.get_score(i) for i in range(n)])
  w.add_token_types(types)
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  w.add_unk_token_id(sp.unk_id())
  if add_bos is not None:
    w.add_add_bos_token(add_bos)
  w.add_tensor("dummy", np.zeros(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_sentencepiece_model_and_gguf_llama_tokenizer(tmp_path):
  sp, proto = _train_sentencepiece()
  (tmp_path / "tokenizer.model").write_bytes(proto)
  vocab = load_tokenizer(str(tmp_path))
  assert isinstance(vocab, seqio.SentencePieceVocabulary) and vocab.eos_id == sp.eos_id()
  transformers = pytest.importorskip("transformers")
  prompt = "Q: what is 12 plus 30?\nA:"
  # tokenizer.model alone: transformers adds a BOS only if tokenizer_config.json says so.
  for add_bos in (None, True, False):
    d = tmp_path / f"sp_dir_{add_bos}"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(proto)
    if add_bos is not None:
      (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": add_bos}))
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert vocab_lib.encode_prompt(load_tokenizer(str(d)), prompt) == ref(prompt)["input_ids"]
    assert vocab_lib.prompt_prefix(load_tokenizer(str(d))) == ((1,) if add_bos else ())
  # The same model as GGUF "llama" tokenizer metadata, rebuilt with `tokenizers`.
  n = sp.get_piece_size()
  gdir = tmp_path / "gguf"        # apart from tokenizer.model, which transformers would prefer
  gdir.mkdir()
  path = _write_sp_gguf(str(gdir / "sp.gguf"), sp)
  ours = load_tokenizer(path)
  assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, n)
  # A "llama" file without add_bos_token adds BOS (transformers and llama.cpp agree).
  assert vocab_lib.prompt_prefix(ours) == (1,)
  for s in STRINGS:
    assert vocab_lib.encode_prompt(ours, s) == [1] + sp.encode(s), s
  off = load_tokenizer(_write_sp_gguf(str(gdir / "sp_nobos.gguf"), sp, add_bos=False))
  assert vocab_lib.prompt_prefix(off) == () and off.bos_id == 1
  for name, vocab_ in (("sp.gguf", ours), ("sp_nobos.gguf", off)):
    ref = transformers.AutoTokenizer.from_pretrained(str(gdir), gguf_file=name)
    for s in (prompt, "The quick brown fox"):
      assert vocab_lib.encode_prompt(vocab_, s) == ref(s)["input_ids"], (name, s)
  for s in STRINGS:
    assert list(ours.encode(s)) == sp.encode(s), s
    assert ours.decode(sp.encode(s)) == sp.decode(sp.encode(s)), s
  out = tmp_path / "export"
  out.mkdir()
  save_tokenizer(vocab, str(out))
  again = load_tokenizer(str(out))
  assert isinstance(again, seqio.SentencePieceVocabulary) and again.prefix_ids == vocab.prefix_ids == ()
  assert list(again.encode(STRINGS[0])) == sp.encode(STRINGS[0])


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match=r"^unsupported GGUF tokenizer model 'bert' in x.gguf"):
    tok_lib.gguf_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
  with pytest.raises(ValueError, match=r"x.gguf: GGUF file has no tokenizer"):
    tok_lib.gguf_tokenizer({"general.architecture": "llama"}, "x.gguf")
  with pytest.raises(ValueError, match=r"^no tokenizer in "):
    load_tokenizer(str(tmp_path))
