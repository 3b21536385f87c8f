"""Model families against transformers: Llama 3.x (llama3 RoPE), Qwen3 and Gemma 3 text.

Each family is a tiny randomly initialised transformers model saved (with a small
tokenizer of the family's kind) into a temporary directory: logits match in float32,
prompts tokenize as AutoTokenizer does, greedy decoding gives the same 32 tokens and
text as `generate`, and export -> reload is identical. Gemma 3 mixes sliding-window and
global layers; its prompts are longer than the window.
"""
import dataclasses
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from lmsi_jax import model as model_lib
from lmsi_jax import sampler
from lmsi_jax import testing
from lmsi_jax.interop import export_hf, load_checkpoint
from lmsi_jax.interop import gguf as gguf_ckpt
from lmsi_jax.interop import tokenizer as tok_lib
from lmsi_jax.data import vocab as vocab_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 300          # the models' vocab_size; the tokenizers use fewer ids (padded rows suppressed)
STEPS = 32
TEXTS = ["the cat sat on the mat", "Q: 12+7=?\nA:", "hello there, in the hat: the theme"]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, tie_word_embeddings=False)
WINDOW = 4


def _byte_bpe(specials, bos=None, split=tok_lib._LLAMA3_SPLIT):  # pylint: disable=protected-access
  """Byte-level BPE (Llama 3 / Qwen style): specials first, then the 256 bytes, a few merges."""
  vocab = {s: i for i, s in enumerate(specials)}
  for ch in tok_lib.bytes_to_unicode().values():
    vocab[ch] = len(vocab)
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "t"), ("Ġ", "c")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
  if bos is None:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  else:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
  return tok


def _tokenizer(family):
  if family == "llama3":     # Llama 3: byte-level BPE, <|begin_of_text|> before every text
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = _byte_bpe(specials, bos="<|begin_of_text|>")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1]), 0, 1
  if family == "qwen3":      # Qwen3: byte-level BPE, no BOS
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_bpe(specials, split=tok_lib._QWEN2_SPLIT)  # pylint: disable=protected-access
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0]), None, 0
  # Gemma: SentencePiece-style BPE (byte fallback), <bos> before every text.
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
  for c in "▁abcdefghijklmnopqrstuvwxyzQA:?0123456789+=.,\n":
    vocab.setdefault(c, len(vocab))
  merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "t"), ("i", "n")]
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  return transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True), 2, 1


def _config(family, bos, eos):
  ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
  if family == "llama3":
    return transformers.LlamaConfig(
        **COMMON, **ids, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500_000.0), transformers.LlamaForCausalLM
  if family == "qwen3":
    return transformers.Qwen3Config(**COMMON, **ids, rms_norm_eps=1e-6,
                                    rope_theta=1_000_000.0), transformers.Qwen3ForCausalLM
  return transformers.Gemma3TextConfig(
      **{**COMMON, "tie_word_embeddings": True}, **ids, rms_norm_eps=1e-6,
      sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=24,
      attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
      attn_implementation="eager"), transformers.Gemma3ForCausalLM


def _randomise(model, seed, one_plus_norms):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.2
      p.copy_(noise if ("norm" not in name or one_plus_norms) else noise + 1.0)
  return model.eval()


@pytest.fixture(scope="module", params=["llama3", "qwen3", "gemma3"])
def family_dir(request, tmp_path_factory):
  family = request.param
  tok, bos, eos = _tokenizer(family)
  cfg, cls = _config(family, bos, eos)
  model = _randomise(cls(cfg), {"llama3": 0, "qwen3": 1, "gemma3": 2}[family], family == "gemma3")
  path = str(tmp_path_factory.mktemp(family))
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return family, path, model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(lm, tokens, remat="none"):
  b, t = tokens.shape
  with jax.set_mesh(lm.mesh):
    logits, _ = jax.jit(model_lib.forward, static_argnums=(0,), static_argnames="remat")(
        lm.graphdef, lm.state, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t), (b, t)),
        model_lib.causal_mask(t), remat=remat)
  return np.asarray(logits)


def _tokens(n=12):
  return np.random.default_rng(0).integers(5, 260, (2, n)).astype(np.int32)


def test_config_options(family_dir, mesh8):
  family, path, _ = family_dir
  lm, _ = load_checkpoint(path, mesh8)
  c = lm.cfg
  if family == "llama3":
    assert (c.rope_type, c.rope_factor, c.rope_original_max_len, c.rope_theta) == (
        "llama3", 8.0, 64, 500_000.0)
    assert not (c.qk_norm or c.post_norms or c.embed_scale or c.sliding_window)
  elif family == "qwen3":
    assert c.qk_norm and not c.qkv_bias and c.head_dim == 16 and c.rope_type == "default"
    assert lm.state["layers"]["attn"]["q_norm"]["scale"][...][0].shape == (16,)
  else:
    assert (c.qk_norm, c.post_norms, c.embed_scale, c.norm_offset, c.mlp_activation) == (
        True, True, True, 1.0, "gelu_tanh")
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (
        WINDOW, 1e6, 1e4, 24.0)
    # transformers' Gemma 3 ignores attn_logit_softcapping (never passed to attention): so do we.
    assert (c.attn_logit_softcap, c.final_logit_softcap, c.tie_embeddings) == (0.0, 30.0, True)


def test_logits_match_transformers(family_dir, mesh8):
  family, path, model = family_dir
  lm, _ = load_checkpoint(path, mesh8)
  tokens = _tokens(12 if family != "gemma3" else 3 * WINDOW)      # longer than the window
  ours = _our_logits(lm, tokens)
  np.testing.assert_allclose(ours[..., :VOCAB], _hf_logits(model, tokens), atol=1e-4, rtol=1e-4)
  if family == "gemma3":
    # With remat (the checkpointed scan body) the per-layer kind (sliding vs global) still holds.
    np.testing.assert_allclose(_our_logits(lm, tokens, remat="full"), ours, atol=1e-5, rtol=1e-5)
    # The window matters here: all-global attention would give other logits.
    full = load_checkpoint(path, mesh8)[0]
    full.cfg = model_lib.ModelConfig(**{**full.cfg.__dict__, "layer_types": (), "sliding_window": 0})
    full.graphdef = model_lib.abstract_model(full.cfg, mesh8)[0]
    assert np.abs(_our_logits(full, tokens) - ours).max() > 1e-3


def test_prompts_and_greedy_text_match_transformers(family_dir, mesh8):
  family, path, model = family_dir
  lm, vocab = load_checkpoint(path, mesh8)
  ref = transformers.AutoTokenizer.from_pretrained(path)
  assert vocab_lib.prompt_prefix(vocab) == ((0,) if family == "llama3" else () if family == "qwen3"
                                             else (2,))
  for text in TEXTS:
    assert vocab_lib.encode_prompt(vocab, text) == ref(text)["input_ids"], text
  if family == "gemma3":
    assert all(len(ref(t)["input_ids"]) > WINDOW for t in TEXTS)
  out = sampler.generate(lm, vocab, TEXTS, temperature=0.0, max_decode_steps=STEPS, stop_strings=(),
                         batch_size=8)
  eos = vocab.eos_id
  for text, (s,) in zip(TEXTS, out):
    ids = ref(text)["input_ids"]
    with torch.no_grad():
      gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=STEPS, min_new_tokens=0, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos,
                           suppress_tokens=list(range(vocab.vocab_size, VOCAB)))  # as vocab_limit
    new = gen[0, len(ids):].tolist()
    if eos in new:
      new = new[: new.index(eos) + 1]
    assert list(s.tokens) == new, text
    body = new[:-1] if new and new[-1] == eos else new
    assert s.text == ref.decode(body, skip_special_tokens=True), text


def _hf_greedy(model, ref, text, eos, vocab_size):
  ids = ref(text)["input_ids"]
  with torch.no_grad():
    gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=STEPS, min_new_tokens=0, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos,
                         suppress_tokens=list(range(vocab_size, VOCAB)))  # as vocab_limit
  new = gen[0, len(ids):].tolist()
  return new[: new.index(eos) + 1] if eos in new else new


def test_sample_cli_prints_transformers_greedy_text(family_dir, mesh8, capsys):
  """`python -m lmsi_jax.sample --temperature 0` on the checkpoint directory prints, for
  each prompt, transformers' greedy continuation of the same text (32 tokens)."""
  from lmsi_jax import sample as sample_cli  # pylint: disable=g-import-not-at-top
  del mesh8    # the CLI builds its own mesh over the 8 devices (--mesh_shape=-1,1,1)
  family, path, model = family_dir
  ref = transformers.AutoTokenizer.from_pretrained(path)
  eos = {"llama3": 1, "qwen3": 0, "gemma3": 1}[family]
  vocab_size = len(ref)
  expected = []
  for i, text in enumerate(TEXTS):
    new = _hf_greedy(model, ref, text, eos, vocab_size)
    body = new[:-1] if new and new[-1] == eos else new
    reason = "eos" if new and new[-1] == eos else "length"
    expected.append(f"=== prompt {i} sample 0 ({reason}, {len(new)} tokens)\n"
                    f"{ref.decode(body, skip_special_tokens=True)}\n")
  capsys.readouterr()
  argv = ["--checkpoint", path, "--temperature", "0", "--max_decode_steps", str(STEPS)]
  for text in TEXTS:
    argv += ["--prompt", text]
  sample_cli.main(argv)
  assert capsys.readouterr().out == "".join(expected)


def test_export_reload_identical(family_dir, mesh8, tmp_path):
  family, path, model = family_dir
  lm, vocab = load_checkpoint(path, mesh8)
  out = export_hf(lm, path, str(tmp_path / "out"), vocab_size=VOCAB)
  with open(os.path.join(out, "config.json")) as f:
    arch = json.load(f)["architectures"]
  assert arch == [{"llama3": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                   "gemma3": "Gemma3ForCausalLM"}[family]]
  lm2, vocab2 = load_checkpoint(out, mesh8)
  assert lm2.cfg == lm.cfg and vocab2 == vocab
  for a, b in zip(jax.tree.leaves(lm.state), jax.tree.leaves(lm2.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kw = {"attn_implementation": "eager"} if family == "gemma3" else {}
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
  tokens = _tokens()
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(model, tokens), atol=1e-5, rtol=1e-5)


def _llama_cpp_rope_factors(rope, head_dim):
  """convert_hf_to_gguf's rope_freqs.weight for `llama3` scaling (LlamaModel.generate_extra_tensors)."""
  base, factor = rope["rope_theta"], rope["factor"]
  low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
  freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  out = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < old / high:
      out.append(1)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def _permute(w, n_head):
  """llama.cpp's Q/K row permutation for arch "llama" (HF rotate_half -> interleaved)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, arch, model, tok_path, *, eos, bos=None, pre="qwen2", theta=1_000_000.0,
                tensors=None, extra_tensors=None):
  """A float32 GGUF of `model` as llama.cpp's converter lays it out (Q/K permuted for "llama")."""
  c = model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_freq_base(theta)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  tj = json.loads(tokenizers.Tokenizer.from_file(tok_path).to_str())
  vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
  tokens = sorted(vocab, key=vocab.get)
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  special = {t["content"] for t in tj["added_tokens"] if t["special"]}
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
  w.add_token_types([3 if t in special else 1 for t in tokens])
  w.add_eos_token_id(eos)
  if bos is not None:
    w.add_bos_token_id(bos)
    w.add_add_bos_token(True)
  if tensors is None:
    tensors = {}
    for k, v in model.state_dict().items():
      x = v.detach().numpy()
      if arch == "llama" and k.endswith(("q_proj.weight", "k_proj.weight")):
        x = _permute(x, c.num_attention_heads if "q_proj" in k else c.num_key_value_heads)
      tensors[gguf_ckpt.gguf_name(k)] = x
  tensors.update(extra_tensors or {})
  for name, x in tensors.items():
    w.add_tensor(name, np.ascontiguousarray(x, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf(family_dir, mesh8, tmp_path):
  """Qwen3 GGUFs load as their HF directory does; a Llama 3.1-style GGUF (RoPE scaling stored as
  rope_freqs.weight factors) matches transformers but refuses export; Gemma 3 GGUFs are refused."""
  family, path, model = family_dir
  out = str(tmp_path / f"{family}.gguf")
  tok_json = os.path.join(path, "tokenizer.json")
  ref = transformers.AutoTokenizer.from_pretrained(path)
  tokens = _tokens()
  if family in ("qwen3", "llama3"):
    if family == "qwen3":
      _write_gguf(out, "qwen3", model, tok_json, eos=0)
    else:
      rope = model.config.rope_parameters
      factors = _llama_cpp_rope_factors(rope, model.config.head_dim)
      assert len(set(factors.tolist())) > 2               # low, medium and high frequencies
      _write_gguf(out, "llama", model, tok_json, eos=1, bos=0, pre="llama-bpe",
                  theta=rope["rope_theta"], extra_tensors={"rope_freqs.weight": factors})
    lm, vocab = load_checkpoint(out, mesh8)
    lm_hf, _ = load_checkpoint(path, mesh8)
    for a, b in zip(jax.tree.leaves(lm.state), jax.tree.leaves(lm_hf.state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for text in TEXTS:
      assert vocab_lib.encode_prompt(vocab, text) == ref(text)["input_ids"], text
    np.testing.assert_allclose(_our_logits(lm, tokens)[..., :VOCAB], _hf_logits(model, tokens),
                               atol=1e-4, rtol=1e-4)
    assert lm.cfg.norm_eps == pytest.approx(lm_hf.cfg.norm_eps)        # GGUF stores a float32
    if family == "qwen3":
      assert lm.cfg == dataclasses.replace(lm_hf.cfg, norm_eps=lm.cfg.norm_eps)
    else:
      assert lm.cfg.rope_type == "default" and lm.cfg.rope_freq_factors == tuple(factors.tolist())
      with pytest.raises(ValueError, match=r"^cannot export RoPE frequency factors \(a GGUF's "
                                           r"rope_freqs.weight\) to Hugging Face format"):
        export_hf(lm, vocab, str(tmp_path / "out"))
    return
  w = gguf.GGUFWriter(out, "gemma3")
  w.add_block_count(3)
  w.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"^unsupported architecture gemma3 in .*gemma3.gguf: a Gemma "
                                       r"GGUF does not carry query_pre_attn_scalar"):
    load_checkpoint(out, mesh8)


def test_all_options_decode_matches_full_forward(mesh8):
  """Every option at once (incl. the attention softcap no imported family uses): KV-cache
  decoding, one token at a time past the window, gives the full forward's logits."""
  lm = testing.all_options_lm(mesh8)
  b, t, p = 2, 10, 4
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (b, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  fwd = jax.jit(model_lib.forward, static_argnums=(0,))
  with jax.set_mesh(mesh8):
    full, _ = fwd(lm.graphdef, lm.state, tokens, pos, model_lib.causal_mask(t))
    cache = model_lib.nnx.merge(lm.graphdef, lm.state).init_cache(b, t)
    mask = jnp.arange(t)[None, None, :] <= jnp.arange(p)[None, :, None]
    out, cache = fwd(lm.graphdef, lm.state, tokens[:, :p], pos[:, :p], mask, cache, 0)
    steps = [out]
    for i in range(p, t):
      m = (jnp.arange(t) <= i)[None, None, :]
      out, cache = fwd(lm.graphdef, lm.state, tokens[:, i:i + 1], pos[:, i:i + 1], m, cache, i)
      steps.append(out)
  np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), np.asarray(full),
                             atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full)).max() <= 5.0          # final softcap
