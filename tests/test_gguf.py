"""GGUF loading: dequantisation on shards, Q/K un-permutation, errors, SmolLM2 reference parity."""
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmsi_jax import model as model_lib
from lmsi_jax import sample as sample_cli
from lmsi_jax import sampler
from lmsi_jax.interop import gguf as gguf_ckpt
from lmsi_jax.interop import load_checkpoint
from lmsi_jax.interop import tokenizer as tok_lib
from lmsi_jax.data import vocab as vocab_lib

Q = gguf.GGMLQuantizationType

# Tiny llama: D=64, H=4 (Dh=16), KV=2, F=128, 2 layers; vocab 260 (byte-level tokens + 4 merges).
D, H, KV, F, L = 64, 4, 2, 128, 2
TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16,
         "attn_output": Q.BF16, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0,
         "output": Q.Q4_0}


def _vocab():
  tokens = list(tok_lib.bytes_to_unicode().values())
  merges = ["Ġ t", "h e", "Ġt he", "i n"]
  return tokens + ["Ġt", "he", "Ġthe", "in"], merges


def _permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf Q/K permutation (HF rotate_half -> interleaved)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _roundtrip(w, qtype):
  """What a reader gets back after writing `w` as `qtype` (exact reference weights)."""
  w = np.asarray(w, np.float32)
  if qtype == Q.F32:
    return w, w
  if qtype == Q.F16:
    return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
  data = gguf.quants.quantize(w, qtype)
  return data, gguf.quants.dequantize(data, qtype).reshape(w.shape)


def write_tiny_gguf(path, *, arch="llama", skip=(), override_type=None, seed=0):
  """Writes a tiny GGUF; returns {HF name: dequantised float32 weight in HF layout}."""
  rng = np.random.default_rng(seed)
  tokens, merges = _vocab()
  v = len(tokens)
  hf = {"model.embed_tokens.weight": ("token_embd.weight", (v, D)),
        "lm_head.weight": ("output.weight", (v, D)),
        "model.norm.weight": ("output_norm.weight", (D,))}
  for i in range(L):
    for name, g, shape in [("input_layernorm.weight", "attn_norm", (D,)),
                           ("post_attention_layernorm.weight", "ffn_norm", (D,)),
                           ("self_attn.q_proj.weight", "attn_q", (H * 16, D)),
                           ("self_attn.k_proj.weight", "attn_k", (KV * 16, D)),
                           ("self_attn.v_proj.weight", "attn_v", (KV * 16, D)),
                           ("self_attn.o_proj.weight", "attn_output", (D, H * 16)),
                           ("mlp.gate_proj.weight", "ffn_gate", (F, D)),
                           ("mlp.up_proj.weight", "ffn_up", (F, D)),
                           ("mlp.down_proj.weight", "ffn_down", (D, F))]:
      hf[f"model.layers.{i}.{name}"] = (f"blk.{i}.{g}.weight", shape)
    if arch == "qwen2":
      for proj, g, n in [("q", "attn_q", H), ("k", "attn_k", KV), ("v", "attn_v", KV)]:
        hf[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = (f"blk.{i}.{g}.bias", (n * 16,))
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(L)
  w.add_context_length(128)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(KV)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types([1] * v)
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  ref = {}
  for name, (gname, shape) in hf.items():
    if gname in skip:
      continue
    x = rng.normal(0, 0.3, shape).astype(np.float32) + (1.0 if "norm" in gname else 0.0)
    qtype = TYPES.get(gname.split(".")[-2], Q.F32) if len(shape) == 2 else Q.F32
    if override_type and gname == override_type[0]:
      qtype = override_type[1]
      data = np.zeros((shape[0], gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
      w.add_tensor(gname, data, raw_dtype=qtype)
      continue
    if gname.split(".")[-2] in ("attn_q", "attn_k") and arch == "llama":
      data, deq = _roundtrip(_permute(x, H if "attn_q" in gname else KV), qtype)
      ref[name] = _permute_back(deq, H if "attn_q" in gname else KV)
    else:
      data, ref[name] = _roundtrip(x, qtype)
    w.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return ref


def _permute_back(w, n_head):
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _np_forward(ref, tokens):
  """Float64 numpy reference forward of the tiny HF-layout model (rotate_half RoPE)."""
  x = ref["model.embed_tokens.weight"][tokens].astype(np.float64)
  t = len(tokens)

  def norm(v, s):
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5) * s

  inv = 1.0 / 10000 ** (np.arange(0, 16, 2) / 16)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(v):  # [T, n, 16]
    rot = np.concatenate([-v[..., 8:], v[..., :8]], -1)
    return v * cos[:, None] + rot * sin[:, None]

  for i in range(L):
    p = lambda n: ref[f"model.layers.{i}.{n}"]  # noqa: E731
    h = norm(x, p("input_layernorm.weight"))
    lin = lambda n: h @ p(f"self_attn.{n}_proj.weight").T + ref.get(  # noqa: E731
        f"model.layers.{i}.self_attn.{n}_proj.bias", 0.0)
    q = rope(lin("q").reshape(t, H, 16))
    k = rope(lin("k").reshape(t, KV, 16)).repeat(H // KV, 1)
    v = lin("v").reshape(t, KV, 16).repeat(H // KV, 1)
    s = np.einsum("thd,shd->hts", q, k) / 4.0 + np.triu(np.full((t, t), -1e30), 1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("hts,shd->thd", a, v).reshape(t, -1) @ p("self_attn.o_proj.weight").T
    h = norm(x, p("post_attention_layernorm.weight"))
    g = h @ p("mlp.gate_proj.weight").T
    x = x + ((g / (1 + np.exp(-g))) * (h @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T
  return norm(x, ref["model.norm.weight"]) @ ref["lm_head.weight"].T


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_loads_sharded_and_matches_reference(tmp_path, mesh8, arch):
  path = str(tmp_path / "tiny.gguf")
  ref = write_tiny_gguf(path, arch=arch)
  lm, vocab = load_checkpoint(path, mesh8)
  cfg = lm.cfg
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      384, D, H, KV, 16)
  assert cfg.qkv_bias == (arch == "qwen2")
  assert not cfg.tie_embeddings and vocab.vocab_size == 260 and vocab.eos_id == 1
  stacked = lm.state["layers"]["attn"]["q_proj"][...]                   # [layers, D, H, Dh]
  assert stacked.sharding.spec == P(None, "fsdp", "model", None)
  assert stacked.addressable_shards[0].data.shape == (2, D // 2, H // 2, 16)
  q = stacked[1]
  np.testing.assert_array_equal(  # un-permuted, dequantised, [D,H,Dh]
      np.asarray(q), ref["model.layers.1.self_attn.q_proj.weight"].reshape(H, 16, D).transpose(2, 0, 1))
  emb = np.asarray(lm.state["embed"][...])
  np.testing.assert_array_equal(emb[:260], ref["model.embed_tokens.weight"])
  assert not emb[260:].any()
  tokens = [0, 5, 7, 258, 259, 100, 3]
  logits, _ = lm(jnp.asarray([tokens]), jnp.arange(7)[None], model_lib.causal_mask(7))
  np.testing.assert_allclose(np.asarray(logits)[0, :, :260], _np_forward(ref, tokens), atol=2e-4)


def test_dequantised_row_slices_match_full_tensor(tmp_path):
  path = str(tmp_path / "q.gguf")
  w = gguf.GGUFWriter(path, "llama")
  rng = np.random.default_rng(1)
  full = {}
  for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16, Q.F16):
    data, full[qtype.name] = _roundtrip(rng.normal(size=(8, 64)), qtype)
    w.add_tensor(qtype.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  reader = gguf.GGUFReader(path)
  for t in reader.tensors:
    src = gguf_ckpt._TensorSource(t, path)  # pylint: disable=protected-access
    assert src.shape == (8, 64)
    np.testing.assert_array_equal(src.read((slice(2, 6), slice(16, 48))), full[t.name][2:6, 16:48])
    np.testing.assert_array_equal(src.read((np.array([7, 0, 3]), slice(0, 64))), full[t.name][[7, 0, 3]])


def test_sample_cli_on_tiny_gguf(tmp_path, capsys):
  path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(path)
  sample_cli.main(["--checkpoint", path, "--prompt", "the", "--prompt", "in", "--temperature", "0",
                   "--max_decode_steps", "4", "--num_samples", "2", "--mesh_shape", "2,2,2"])
  out = capsys.readouterr().out
  assert out.count("=== prompt") == 4 and "prompt 1 sample 1 (" in out


def test_gguf_errors(tmp_path, mesh8):
  bad = str(tmp_path / "q5k.gguf")
  write_tiny_gguf(bad, override_type=("blk.0.attn_q.weight", Q.Q5_K))
  with pytest.raises(ValueError, match=r"^unsupported GGUF tensor type Q5_K for blk.0.attn_q.weight in "):
    load_checkpoint(bad, mesh8)
  missing = str(tmp_path / "missing.gguf")
  write_tiny_gguf(missing, skip=("blk.1.ffn_up.weight",))
  with pytest.raises(ValueError, match=r"^blk.1.ffn_up.weight: missing in .*missing.gguf"):
    load_checkpoint(missing, mesh8)
  arch = str(tmp_path / "arch.gguf")
  write_tiny_gguf(arch, arch="gpt2")
  with pytest.raises(ValueError, match=r"^unsupported architecture gpt2 in .*arch.gguf"):
    load_checkpoint(arch, mesh8)
  trunc = str(tmp_path / "trunc.gguf")
  with open(missing, "rb") as f:
    data = f.read()
  with open(trunc, "wb") as f:
    f.write(data[: len(data) // 3])
  with pytest.raises(ValueError, match=r"trunc.gguf: unreadable or truncated GGUF file"):
    load_checkpoint(trunc, mesh8)
  with pytest.raises(ValueError, match="does not exist"):
    load_checkpoint(str(tmp_path / "nope.bin"), mesh8)


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def smollm2(mesh8, smollm2_gguf):
  path = smollm2_gguf
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)          # tiny matmuls: extra threads only contend on small hosts
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                  gguf_file=os.path.basename(path))
  lm, vocab = load_checkpoint(path, mesh8)
  yield lm, vocab, hf, tok, torch
  torch.set_num_threads(threads)


PROMPTS = ["The capital of France is", "Q: What is 12 + 30?\nA:", "def fib(n):",
           "Q: A farmer has 12 cows and buys 7 more. How many cows does he have?\nA:"]


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
  lm, vocab, hf, _, torch = smollm2
  assert lm.cfg.vocab_size == 49152 and lm.cfg.num_layers == 30 and lm.cfg.tie_embeddings
  ids = [vocab_lib.encode_prompt(vocab, p) for p in PROMPTS[:3]]   # as sampled
  t = max(map(len, ids))
  batch = np.array([r + [0] * (t - len(r)) for r in ids], np.int32)   # right padding: causal
  ours, _ = lm(jnp.asarray(batch), jnp.broadcast_to(jnp.arange(t), batch.shape),
               model_lib.causal_mask(t))
  ours = np.asarray(ours)
  for i, r in enumerate(ids):
    with torch.no_grad():
      ref = hf(torch.tensor([r])).logits[0].numpy()
    np.testing.assert_allclose(ours[i, : len(r), : ref.shape[-1]], ref, atol=1e-3, rtol=0)


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_greedy_tokens_match_transformers(smollm2):
  """The same text gives the same prompt ids and the same 32 greedy tokens as transformers
  (tokenizer and model both from the GGUF). SmolLM2 adds no BOS: before, a start token
  (<|endoftext|>) was prepended and the model ended the farmer's answer at once."""
  lm, vocab, hf, tok, torch = smollm2
  prompts = [PROMPTS[1], PROMPTS[3]]
  out = sampler.generate(lm, vocab, prompts, temperature=0.0, max_decode_steps=32,
                         stop_strings=(), batch_size=4)
  for p, (s,) in zip(prompts, out):
    ids = tok(p)["input_ids"]
    assert vocab_lib.encode_prompt(vocab, p) == ids, p
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=32, do_sample=False, eos_token_id=vocab.eos_id,
                        pad_token_id=vocab.eos_id)
    assert list(s.tokens) == ref[0, len(ids):].tolist(), p
  assert out[1][0].text.startswith(" 12 + 7 = 19"), out[1][0].text
