"""Tests for lmsi_jax.data: vocabularies, JSONL I/O, tasks, packing, BatchIterator."""
import json
import os

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tokenizers = pytest.importorskip("tokenizers")

from lmsi_jax.interop import tokenizer as tok_lib  # noqa: E402
from lmsi_jax.data import features  # noqa: E402
from lmsi_jax.data import jsonl  # noqa: E402
from lmsi_jax.data import tasks  # noqa: E402
from lmsi_jax.data import vocab as vocab_lib  # noqa: E402

TEXTS = ["Q: what is 3 + 4?\nA:", "3 + 4 = 7. The answer is 7.", "héllo wörld ✓ naïve",
         "Natalia sold clips to 48 of her friends.", "The answer is 72."]


def _records(n, tag="", long_every=0):
  out = []
  for i in range(n):
    tgt = f"{tag}{i} + {i} = {2 * i}. " * (1 + i % 3) + f"The answer is {2 * i}."
    if long_every and i % long_every == long_every - 1:
      tgt = tgt * 8
    out.append({"inputs": f"Q{tag}{i}: what is {i} + {i}?\nA:", "targets": tgt, "meta": {"i": i}})
  return out


@pytest.fixture(scope="module")
def hf_tokenizer():
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 20 + [r["targets"] for r in _records(20)], trainer)
  return tok


@pytest.fixture(scope="module")
def hf_vocab(hf_tokenizer, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  hf_tokenizer.save(str(path))
  return vocab_lib.HFTokenizersVocabulary(str(path), eos="</s>", bos="<s>", unk="<unk>")


@pytest.fixture(scope="module")
def hf_bos_vocab(hf_tokenizer):
  """The same tokenizer with a post-processor that puts <s> (id 3) before every text."""
  tok = tokenizers.Tokenizer.from_str(hf_tokenizer.to_str())
  tok_lib.set_bos_post_processor(tok, 3)
  return vocab_lib.HFTokenizersVocabulary(tok, eos="</s>", bos="<s>", unk="<unk>")


# ---------------------------------------------------------------- vocabularies


def test_byte_vocabulary_and_padding():
  v = vocab_lib.byte_vocabulary()
  assert (v.pad_id, v.eos_id, v.unk_id, v.vocab_size) == (0, 1, 2, 259)
  assert list(v.encode("Ab")) == [ord("A") + 3, ord("b") + 3]
  for s in TEXTS:
    assert v.decode(v.encode(s)) == s
  assert v.decode(list(v.encode("hi")) + [1, 50, 60, 0, 0]) == "hi"
  assert vocab_lib.prompt_prefix(v) == (0,) and features.start_id(v) == 0
  assert vocab_lib.encode_prompt(v, "hi") == [0, ord("h") + 3, ord("i") + 3]
  assert vocab_lib.padded_vocab_size(259) == 384
  assert vocab_lib.padded_vocab_size(256) == 256
  assert vocab_lib.padded_vocab_size(300, 64) == 320


def test_hf_vocabulary_roundtrip(hf_tokenizer, hf_vocab, hf_bos_vocab):
  v = hf_vocab
  assert (v.eos_id, v.bos_id, v.unk_id) == (1, 3, 2)
  assert v.vocab_size == hf_tokenizer.get_vocab_size()
  # A BOS is added only where the tokenizer's post-processor adds one.
  assert vocab_lib.prompt_prefix(v) == () and features.start_id(v) is None
  assert vocab_lib.prompt_prefix(hf_bos_vocab) == (3,) and features.start_id(hf_bos_vocab) == 3
  assert hf_bos_vocab != v
  for s in TEXTS:
    ids = v.encode(s)
    assert v.eos_id not in ids and v.bos_id not in ids
    assert v.decode(ids) == s
    assert vocab_lib.encode_prompt(v, s) == list(ids) == hf_tokenizer.encode(s).ids
    assert list(hf_bos_vocab.encode(s)) == list(ids)
    assert vocab_lib.encode_prompt(hf_bos_vocab, s) == [3] + list(ids)
    assert vocab_lib.encode_prompt(hf_bos_vocab, s) == hf_bos_vocab.tokenizer.encode(s).ids
  ids = list(v.encode("The answer is 7."))
  assert v.decode([3] + ids + [v.eos_id] + ids + [0, 0]) == "The answer is 7."  # stops at EOS
  assert v.decode(ids + [0, 0, 0]) == "The answer is 7."  # trailing pads dropped
  # In-memory tokenizer (as rebuilt from GGUF) with ids instead of strings: equal vocabulary.
  same = vocab_lib.HFTokenizersVocabulary(hf_tokenizer, eos=1, bos=3, unk=2)
  assert same == v and hash(same) == hash(v)
  assert vocab_lib.HFTokenizersVocabulary(hf_tokenizer, eos=1) != v
  assert v != vocab_lib.byte_vocabulary()
  with pytest.raises(ValueError, match="not in the tokenizer"):
    vocab_lib.HFTokenizersVocabulary(hf_tokenizer, eos="<|nope|>")


def test_hf_vocabulary_tf_ops_in_tf_data(hf_vocab):
  v = hf_vocab
  ds = tf.data.Dataset.from_tensor_slices(TEXTS).map(v.encode_tf)
  encoded = [x.tolist() for x in ds.as_numpy_iterator()]
  assert encoded == [list(v.encode(s)) for s in TEXTS]
  width = max(map(len, encoded)) + 2
  padded = np.array([e + [v.eos_id] + [0] * (width - len(e) - 1) for e in encoded], np.int32)
  dec = tf.data.Dataset.from_tensors(padded).map(v.decode_tf)
  assert [b.decode() for b in next(dec.as_numpy_iterator())] == TEXTS
  assert v.decode_tf(tf.constant(padded[0])).numpy().decode() == TEXTS[0]


# ------------------------------------------------------------------------ JSONL


def _write_lines(path, lines):
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")


GOOD = b'{"inputs": "q", "targets": "a"}'


@pytest.mark.parametrize("bad,what", [
    (b'{"inputs": "q", "targets": ', "malformed JSON"),
    (b'{"inputs": "q"}', "missing required key 'targets'"),
    (b'{"inputs": "q", "targets": ""}', "key 'targets' is empty"),
    (b'{"inputs": "q", "targets": 7}', "key 'targets' must be a string"),
    (b'{"inputs": "q\xff", "targets": "a"}', "invalid UTF-8"),
    (b'["inputs", "targets"]', "expected a JSON object"),
])
def test_read_jsonl_errors(tmp_path, bad, what):
  path = str(tmp_path / "x.jsonl")
  _write_lines(path, [GOOD, b"", bad, GOOD])
  with pytest.raises(ValueError) as e:
    jsonl.read_jsonl(path, required_keys=("inputs", "targets"))
  msg = str(e.value)
  assert msg.startswith(f"{path}:3: ") and what in msg and "\n" not in msg
  stats = {}
  recs = jsonl.read_jsonl(path, required_keys=("inputs", "targets"), on_error="skip", stats=stats)
  assert recs == [{"inputs": "q", "targets": "a"}] * 2
  assert stats == {"read": 2, "skipped": 1}


def test_write_jsonl_atomic(tmp_path):
  path = str(tmp_path / "out.jsonl")
  recs = [{"targets": "ü ✓", "inputs": "x", "n": 1}, {"inputs": "y", "targets": "z"}]
  assert jsonl.write_jsonl_atomic(path, recs) == 2
  old = open(path, "rb").read()
  assert old.splitlines()[0] == '{"inputs": "x", "n": 1, "targets": "ü ✓"}'.encode()
  assert jsonl.read_jsonl(path) == recs
  jsonl.write_jsonl_atomic(path, [dict(reversed(list(r.items()))) for r in recs])
  assert open(path, "rb").read() == old  # byte-identical for identical records

  def failing():
    yield {"inputs": "new", "targets": "new"}
    yield {"inputs": "bad", "targets": object()}  # not JSON serialisable, mid-way
  with pytest.raises(TypeError):
    jsonl.write_jsonl_atomic(path, failing())
  assert open(path, "rb").read() == old
  assert os.listdir(tmp_path) == ["out.jsonl"]
  with pytest.raises(ValueError):
    jsonl.write_jsonl_atomic(str(tmp_path / "new.jsonl"), [{"x": float("nan")}])
  assert os.listdir(tmp_path) == ["out.jsonl"]


# ------------------------------------------------------------- tasks & packing


def _segments(row):
  """Yields (tokens, targets, loss_weights) per segment of a packed row."""
  seg = row["segment_ids"]
  for s in np.unique(seg[seg > 0]):
    m = seg == s
    assert np.all(np.diff(np.flatnonzero(m)) == 1), "segments are contiguous"
    assert np.array_equal(row["positions"][m], np.arange(m.sum()))
    yield row["tokens"][m], row["targets"][m], row["loss_weights"][m]


def _decode_rows(rows, v, start):
  """Checks per-segment invariants; returns [(inputs_text, targets_text, targets_end_in_eos)]."""
  out = []
  for row in rows:
    assert np.all(row["tokens"][row["segment_ids"] == 0] == 0)
    assert np.all(row["loss_weights"][row["segment_ids"] == 0] == 0)
    for tok, tgt, w in _segments(row):
      assert np.array_equal(tok[1:], tgt[:-1])  # tokens[t+1] == targets[t]
      n_in = int(np.argmax(w > 0)) if w.any() else len(w)
      assert np.all(w[:n_in] == 0) and np.all(w[n_in:] == 1)  # loss on targets only
      if start is None:    # no start token: the first input token starts the segment
        inputs, tgts = np.concatenate([tok[:1], tgt[:n_in]]), tgt[n_in:]
      else:
        assert tok[0] == start
        inputs, tgts = tgt[:n_in], tgt[n_in:]
      out.append((v.decode(inputs), v.decode(tgts), bool(tgt[-1] == v.eos_id)))
      # A segment's tokens up to its targets are exactly the prompt the sampler feeds.
      assert list(tok[:n_in + 1]) == vocab_lib.encode_prompt(v, out[-1][0])
  return out


@pytest.mark.parametrize("vocab_name", ["byte", "hf", "hf_bos"])
def test_jsonl_task_packing_roundtrip(tmp_path, hf_vocab, hf_bos_vocab, vocab_name):
  v = {"byte": vocab_lib.byte_vocabulary(), "hf": hf_vocab, "hf_bos": hf_bos_vocab}[vocab_name]
  start = features.start_id(v)
  seq_len = 128
  recs = _records(12, long_every=6)
  k = next(k for k in range(1, seq_len) if len(v.encode("zqxj " * k + "vkwp " * k)) >= seq_len)
  both_long = {"inputs": "zqxj " * k, "targets": "vkwp " * k}  # only inputs + targets > seq_len
  assert all(len(v.encode(x)) < seq_len for x in both_long.values())
  recs.insert(3, both_long)
  path = str(tmp_path / "round.jsonl")
  jsonl.write_jsonl_atomic(path, recs)
  name = tasks.round_task_name(f"unit_{vocab_name}", 1)
  assert name == f"lmsi_unit_{vocab_name}_round_1"
  tasks.register_task(name, path, v)
  counter = tf.Variable(0, dtype=tf.int64)
  rows = list(features.packed_dataset(name, seq_len, shuffle=False, truncated=counter).as_numpy_iterator())
  assert rows and all(r["tokens"].shape == (seq_len,) and r["tokens"].dtype == np.int32 for r in rows)
  assert rows[0]["loss_weights"].dtype == np.float32
  got = _decode_rows(rows, v, start)
  assert [g[0] for g in got] == [r["inputs"] for r in recs]
  n_long = 0
  for (inp, tgt, has_eos), r in zip(got, recs):
    full = len(v.encode(r["inputs"])) + len(v.encode(r["targets"])) + 1  # + EOS
    if full <= seq_len:
      assert tgt == r["targets"] and has_eos
    else:  # truncated on the right, not dropped
      n_long += 1
      assert r["targets"].startswith(tgt) and len(tgt) < len(r["targets"]) and not has_eos
  assert n_long == 3 and int(counter.numpy()) == 3

  # Re-registering replaces the task.
  recs2 = _records(3, tag="B")
  path2 = str(tmp_path / "round_b.jsonl")
  jsonl.write_jsonl_atomic(path2, recs2)
  tasks.register_task(name, path2, v)
  rows = list(features.packed_dataset(name, seq_len, shuffle=False).as_numpy_iterator())
  assert [g[1] for g in _decode_rows(rows, v, start)] == [r["targets"] for r in recs2]


def test_mixture_yields_both_tasks(tmp_path):
  v = vocab_lib.byte_vocabulary()
  names = []
  for tag in ("A", "B"):
    path = str(tmp_path / f"{tag}.jsonl")
    jsonl.write_jsonl_atomic(path, _records(10, tag=tag))
    names.append(tasks.register_task(tasks.round_task_name(f"mix{tag}", 0), path, v).name)
  seed_task = tasks.make_task(tasks.seed_task_name("mix"), str(tmp_path / "A.jsonl"), v)
  with pytest.raises(ValueError, match="positive"):
    tasks.register_mixture("lmsi_unit_mix", [(names[0], 0.0)])
  tasks.register_mixture("lmsi_unit_mix", [(names[0], 1.0)])
  mix = tasks.register_mixture("lmsi_unit_mix", [(names[0], 1.0), (names[1], 1.0), (seed_task, 0.5)])
  assert seqio.MixtureRegistry.get("lmsi_unit_mix") is mix and len(mix.tasks) == 3
  rows = list(features.packed_dataset("lmsi_unit_mix", 128, seed=3).as_numpy_iterator())
  inputs = [g[0] for g in _decode_rows(rows, v, 0)]
  assert any(s.startswith("QA") for s in inputs) and any(s.startswith("QB") for s in inputs)


# ---------------------------------------------------------------- BatchIterator


@pytest.fixture(scope="module")
def iter_task(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("it") / "it.jsonl")
  jsonl.write_jsonl_atomic(path, _records(16))
  return tasks.register_task(tasks.round_task_name("unit_iter", 0), path, vocab_lib.byte_vocabulary())


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_batch_iterator_determinism_and_restore(iter_task):
  mk = lambda seed=0: features.BatchIterator(iter_task.name, 128, 4, seed=seed)
  it1, it2 = mk(), mk()
  a, b = _take(it1, 3), _take(it2, 3)
  assert _same(a, b)
  assert a[0]["tokens"].shape == (4, 128) and set(a[0]) == {
      "tokens", "targets", "loss_weights", "segment_ids", "positions"}
  assert not _same(a[:1], _take(mk(seed=1), 1))
  state = json.loads(json.dumps(it1.state()))
  assert state["epoch"] == 1 and state["row"] > 0  # 3rd batch crossed an epoch end
  rest = _take(it1, 2)
  it3 = mk()
  it3.restore(state)
  assert _same(_take(it3, 2), rest)
  assert it3.state() == it1.state()
  with pytest.raises(ValueError, match="seed"):
    mk(seed=5).restore(state)


def test_batch_iterator_builds_next_epoch_ahead_only_when_needed(iter_task):
  """Epochs built on the background thread equal those built in line; with a
  `num_batches` hint no epoch beyond the last one needed is built."""
  ref = features.BatchIterator(iter_task.name, 64, 4, seed=2)   # one epoch is a few batches
  want = _take(ref, 12)
  assert ref.state()["epoch"] >= 2
  ahead = features.BatchIterator(iter_task.name, 64, 4, seed=2)
  got = [next(ahead)]
  assert ahead._ahead is not None and ahead._ahead[0] == 1   # no hint: always one ahead
  got += _take(ahead, 11)
  assert _same(got, want)
  last = ref.state()["epoch"]                 # the last epoch the 12 batches read
  hinted = features.BatchIterator(iter_task.name, 64, 4, seed=2, num_batches=12)
  built, ahead_epochs = [], set()
  for _ in range(12):
    built.append(next(hinted))
    if hinted._ahead is not None:
      ahead_epochs.add(hinted._ahead[0])
  assert _same(built, want)
  assert ahead_epochs and max(ahead_epochs) == last, (ahead_epochs, last)


def test_batch_iterator_sharding(iter_task):
  v = vocab_lib.byte_vocabulary()
  seen = []
  for i in (0, 1):
    ds = features.packed_dataset(iter_task, 96, seed=7, shard_info=seqio.ShardInfo(i, 2))
    rows = list(ds.as_numpy_iterator())
    seen.append([g[0] for g in _decode_rows(rows, v, 0)])
    batch = next(features.BatchIterator(iter_task, 96, 4, seed=7, shard_index=i, num_shards=2))
    assert batch["tokens"].shape == (2, 96)
    assert np.array_equal(batch["tokens"], np.stack([r["tokens"] for r in rows[:2]]))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(r["inputs"] for r in _records(16))




def test_global_batches_do_not_depend_on_process_count(iter_task):
  """Two processes' rows, concatenated, equal the one-process global batch."""
  one = features.GlobalBatches(iter_task, 32, 4, seed=3, num_shards=2)
  halves = [features.GlobalBatches(iter_task, 32, 4, seed=3, num_shards=2, process_index=p,
                                   process_count=2) for p in (0, 1)]
  assert halves[0].local_batch_size == 2 and one.local_batch_size == 4
  for _ in range(3):
    a = next(one)
    b = [next(h) for h in halves]
    for k in a:
      np.testing.assert_array_equal(a[k], np.concatenate([b[0][k], b[1][k]]))
  st = halves[1].state()
  want = next(halves[1])
  again = features.GlobalBatches(iter_task, 32, 4, seed=3, num_shards=2, process_index=1,
                                 process_count=2)
  again.restore(st)
  np.testing.assert_array_equal(next(again)["tokens"], want["tokens"])
  with pytest.raises(ValueError, match="train.data_shards=3"):
    features.GlobalBatches(iter_task, 32, 4, num_shards=3, process_count=2)


def test_truncated_examples_counted_within_the_epoch(iter_task):
  """Over-long examples are counted as they are read, not only when an epoch ends."""
  v = vocab_lib.byte_vocabulary()
  lengths = [len(v.encode(r["inputs"])) + len(v.encode(r["targets"])) + 1 for r in _records(16)]
  # Every example is longer than a row, so each fills one row: an epoch is 16 rows, 4 batches.
  it = features.GlobalBatches(iter_task, min(lengths) - 1, 4, seed=0)
  assert it.truncated == 0
  next(it)
  assert 4 <= it.truncated <= 16                      # this batch + what packing read ahead
  for _ in range(3):
    next(it)
  assert it.truncated == 16                           # epoch 0, before its end is noticed
  next(it)
  assert 20 <= it.truncated <= 32
  fits = features.GlobalBatches(iter_task, max(lengths), 4, seed=0)
  next(fits)
  assert fits.truncated == 0
