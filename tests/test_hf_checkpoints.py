"""HF checkpoint import/export against transformers: tiny random Llama and Qwen2, sharded files, errors."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from jax.sharding import PartitionSpec as P

from lmsi_jax import model as model_lib
from lmsi_jax.interop import export_hf, load_checkpoint, save_tokenizer
from lmsi_jax.interop import hf as hf_ckpt
from lmsi_jax.data import vocab as vocab_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[0, 5, 17, 299, 42, 7, 3, 250], [0, 104, 105, 33, 258, 1, 9, 11]], np.int32)


def _save(model, path, **kw):
  model.save_pretrained(path, **kw)
  save_tokenizer(vocab_lib.byte_vocabulary(), path)
  return str(path)


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 64 else 0.0))
  return model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  cfg = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
      rms_norm_eps=1e-5, tie_word_embeddings=False,
      rope_parameters={"rope_theta": 50_000.0, "rope_type": "default"})
  model = _randomise(transformers.LlamaForCausalLM(cfg), 0)
  path = _save(model, tmp_path_factory.mktemp("llama"), max_shard_size="60KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  return path, model


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
  cfg = transformers.Qwen2Config(
      vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rms_norm_eps=1e-6, tie_word_embeddings=True)
  model = _randomise(transformers.Qwen2ForCausalLM(cfg), 1)
  path = _save(model, tmp_path_factory.mktemp("qwen2"))
  assert os.path.exists(os.path.join(path, "model.safetensors"))
  return path, model


def _hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(lm, tokens=TOKENS):
  b, t = tokens.shape
  logits, _ = lm(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t), (b, t)), model_lib.causal_mask(t))
  return np.asarray(logits)


def test_llama_sharded_import_matches_transformers(llama_dir, mesh8):
  path, model = llama_dir
  lm, vocab = load_checkpoint(path, mesh8)
  assert isinstance(vocab, seqio.ByteVocabulary)
  cfg = lm.cfg
  assert (cfg.vocab_size, cfg.head_dim, cfg.rope_theta, cfg.tie_embeddings, cfg.qkv_bias) == (
      384, 32, 50_000.0, False, False)
  stacked = lm.state["layers"]["attn"]["q_proj"][...]                   # [layers, D, H, Dh]
  assert stacked.sharding.spec == P(None, "fsdp", "model", None)
  assert stacked.addressable_shards[0].data.shape == (2, 32, 2, 32)
  q = stacked[1]
  ref_q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()       # [H*Dh, D]
  np.testing.assert_array_equal(np.asarray(q), ref_q.reshape(4, 32, 64).transpose(2, 0, 1))
  head = lm.state["lm_head"][...]
  assert head.sharding.spec == P("fsdp", "model")
  assert not np.asarray(head)[:, 300:].any()
  ours = _our_logits(lm)
  np.testing.assert_allclose(ours[..., :300], _hf_logits(model), atol=1e-4, rtol=1e-4)
  assert not ours[..., 300:].any()


def test_llama_export_roundtrip(llama_dir, mesh8, tmp_path):
  path, model = llama_dir
  lm, vocab = load_checkpoint(path, mesh8)
  out = export_hf(lm, vocab, str(tmp_path / "out"), vocab_size=300, max_shard_size=60_000)
  files = os.listdir(out)
  assert "model.safetensors.index.json" in files and "tokenizer.json" in files
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(_hf_logits(back), _hf_logits(model), atol=1e-5, rtol=1e-5)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  text = "héllo 🙂\n"
  assert tok(text, add_special_tokens=False)["input_ids"] == list(vocab.encode(text))
  lm2, vocab2 = load_checkpoint(out, mesh8)
  assert isinstance(vocab2, seqio.ByteVocabulary) and lm2.cfg == lm.cfg
  np.testing.assert_array_equal(np.asarray(lm2.state["layers"]["attn"]["o_proj"][...][0]),
                                np.asarray(lm.state["layers"]["attn"]["o_proj"][...][0]))


def test_qwen2_tied_import_and_export(qwen2_dir, mesh8, tmp_path):
  path, model = qwen2_dir
  lm, vocab = load_checkpoint(path, mesh8)
  assert lm.cfg.qkv_bias and lm.cfg.tie_embeddings and "lm_head" not in lm.state
  kb = np.asarray(lm.state["layers"]["attn"]["k_bias"][...][0])
  np.testing.assert_array_equal(kb.reshape(-1), model.model.layers[0].self_attn.k_proj.bias.detach().numpy())
  np.testing.assert_allclose(_our_logits(lm)[..., :300], _hf_logits(model), atol=1e-4, rtol=1e-4)
  out = export_hf(lm, vocab, str(tmp_path / "qwen_out"))          # vocab -> tokenizer size 259
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == ["Qwen2ForCausalLM"] and config["vocab_size"] == 259
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.minimum(TOKENS, 258)
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(model, tokens)[..., :259],
                             atol=1e-5, rtol=1e-5)


def test_param_dtype_and_context_overrides(qwen2_dir, mesh8):
  lm, _ = load_checkpoint(qwen2_dir[0], mesh8, dtype="bfloat16", max_seq_len=64)
  assert lm.cfg.param_dtype == "bfloat16" and lm.cfg.max_seq_len == 64
  assert lm.state["embed"][...].dtype == jnp.bfloat16


def test_config_mapping():
  base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=1000, rms_norm_eps=1e-5)
  mistral = hf_ckpt.model_config(
      {**base, "architectures": ["MistralForCausalLM"], "num_key_value_heads": 2,
       "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 1e6}, "c.json")
  assert (mistral.vocab_size, mistral.max_seq_len, mistral.rope_theta, mistral.num_kv_heads) == (
      1024, 4096, 1e6, 2)
  qwen = hf_ckpt.model_config({**base, "model_type": "qwen2", "sliding_window": 4096,
                               "use_sliding_window": False, "max_position_embeddings": 32768,
                               "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
                              "c.json")
  assert qwen.qkv_bias and qwen.max_seq_len == 32768 and qwen.num_kv_heads == 4
  with pytest.raises(ValueError, match=r"^unsupported RoPE scaling 'yarn' in c.json"):
    hf_ckpt.model_config({**base, "architectures": ["LlamaForCausalLM"],
                          "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}}, "c.json")
  with pytest.raises(ValueError, match=r"^unsupported architecture GPT2LMHeadModel in c.json"):
    hf_ckpt.model_config({**base, "architectures": ["GPT2LMHeadModel"]}, "c.json")
  with pytest.raises(ValueError, match=r"c.json: missing config field num_attention_heads"):
    hf_ckpt.model_config({"architectures": ["LlamaForCausalLM"]}, "c.json")


def _copy(src, tmp_path, name):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _edit_json(path, fn):
  with open(path) as f:
    obj = json.load(f)
  fn(obj)
  with open(path, "w") as f:
    json.dump(obj, f)


def test_bad_checkpoints(llama_dir, mesh8, tmp_path):
  src = llama_dir[0]
  with open(os.path.join(src, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  shard = weight_map["model.layers.1.mlp.up_proj.weight"]

  d = _copy(src, tmp_path, "truncated")
  with open(os.path.join(d, shard), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(d, shard)) - 100)
  with pytest.raises(ValueError, match=rf"{shard}: unreadable or truncated safetensors file"):
    load_checkpoint(d, mesh8)

  d = _copy(src, tmp_path, "missing")
  _edit_json(os.path.join(d, "model.safetensors.index.json"),
             lambda o: o["weight_map"].pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"^model.layers.1.mlp.up_proj.weight: missing in .*missing$"):
    load_checkpoint(d, mesh8)

  d = _copy(src, tmp_path, "arch")
  _edit_json(os.path.join(d, "config.json"), lambda o: o.update(architectures=["GPT2LMHeadModel"]))
  with pytest.raises(ValueError, match=r"^unsupported architecture GPT2LMHeadModel in .*arch/config.json"):
    load_checkpoint(d, mesh8)

  d = _copy(src, tmp_path, "shape")
  _edit_json(os.path.join(d, "config.json"), lambda o: o.update(intermediate_size=96))
  with pytest.raises(ValueError, match=r"^model.layers.0.mlp.down_proj.weight: shape \(64, 128\) in "
                                       r".* does not match \(64, 96\) expected from config.json"):
    load_checkpoint(d, mesh8)

  d = _copy(src, tmp_path, "notok")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.remove(os.path.join(d, name))
  with pytest.raises(ValueError, match=r"^no tokenizer in .*notok"):
    load_checkpoint(d, mesh8)


def _llama_tokenizer(add_bos: bool):
  """A small SentencePiece-style BPE tokenizer (ids < 300) that does or does not add <s>."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for c in "▁abcdefghijklmnopqrstuvwxyzQA:?0123456789+=.":
    vocab.setdefault(c, len(vocab))
  merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "t")]
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  return transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=add_bos)


@pytest.mark.parametrize("add_bos", [True, False])
def test_prompts_tokenized_and_decoded_as_transformers(llama_dir, mesh8, tmp_path, add_bos):
  """Prompt ids are the checkpoint tokenizer's own (BOS only if it adds one); greedy tokens too."""
  from lmsi_jax import sampler  # pylint: disable=g-import-not-at-top
  from lmsi_jax.data import features  # pylint: disable=g-import-not-at-top
  src, model = llama_dir
  path = str(tmp_path / "ckpt")
  shutil.copytree(src, path)
  _llama_tokenizer(add_bos).save_pretrained(path)       # replaces the byte tokenizer files
  lm, vocab = load_checkpoint(path, mesh8)
  ref = transformers.AutoTokenizer.from_pretrained(path)
  assert isinstance(vocab, vocab_lib.HFTokenizersVocabulary)
  assert vocab_lib.prompt_prefix(vocab) == ((1,) if add_bos else ())
  assert features.start_id(vocab) == (1 if add_bos else None)
  texts = ["the cat", "Q: 12+7=?\nA:", "at"]
  for text in texts:
    assert vocab_lib.encode_prompt(vocab, text) == ref(text)["input_ids"], text
  steps = 8
  out = sampler.generate(lm, vocab, texts, temperature=0.0, max_decode_steps=steps, stop_strings=(),
                         batch_size=4)
  for text, (s,) in zip(texts, out):
    ids = ref(text)["input_ids"]
    with torch.no_grad():
      gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=steps, do_sample=False, eos_token_id=2, pad_token_id=2,
                           suppress_tokens=list(range(vocab.vocab_size, 300)))   # as vocab_limit
    new = gen[0, len(ids):].tolist()
    if 2 in new:
      new = new[: new.index(2) + 1]
    assert list(s.tokens) == new, text
