"""GSM8K loaders (real files), bad-input errors, SeqIO tasks over JSONL and mocked TFDS."""
import json
import logging
import os

import pytest

from lmsi_jax.data import gsm8k

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
GOOD = {"question": "How many clips?", "answer": SOLUTION}


def _gsm8k_dir(shared_dir):
  return os.path.join(shared_dir, "data", "gsm8k")


def test_gold_answer_and_cot():
  assert gsm8k.gold_answer(SOLUTION) == "72"
  assert gsm8k.gold_answer("x\n#### 1,200") == "1200"
  assert gsm8k.gold_answer("x\n#### -3") == "-3"
  assert gsm8k.gold_cot(SOLUTION) == (
      "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether "
      "in April and May. The answer is 72.")
  assert gsm8k.gold_cot("It is 70,000.\n#### 70,000") == "It is 70,000. The answer is 70000."
  with pytest.raises(ValueError, match="####"):
    gsm8k.gold_answer("no final line")


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is $1,200.", "1200"),
    ("The answer is 5.50.", "5.5"),
    ("first 3. The answer is 18. Q: next has 99", "18"),
    ("... #### 42", "42"),
    ("no cue, last number is 12 then 13.", "13"),
    ("The answer is unknown.", ""),
    (b"The answer is -4.", "-4"),
])
def test_extract_answer(text, want):
  assert gsm8k.extract_answer(text) == want


def test_metric_fn():
  assert gsm8k.metric_fn(["18", "1200", "5"], ["18", "1,200", ""]) == pytest.approx(
      {"accuracy": 200 / 3})


def test_real_files(shared_dir):
  d = _gsm8k_dir(shared_dir)
  train, test = gsm8k.load_split(d, "train"), gsm8k.load_split(d, "test")
  assert (len(train), len(test)) == (7473, 1319)
  assert train[0] == {
      "id": "train-1",
      "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                  "many clips in May. How many clips did Natalia sell altogether in April and May?",
      "answer": "72",
      "cot": "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in "
             "April and May. The answer is 72.",
      "source": os.path.join(d, "train.jsonl") + ":1"}
  assert test[-1]["id"] == "test-1319"
  commas = 0
  for r in train + test:
    assert str(int(r["answer"])) == r["answer"]
    assert r["cot"].endswith(f"The answer is {r['answer']}.")
    assert "<<" not in r["cot"] and ">>" not in r["cot"] and "####" not in r["cot"]
    assert "\n" not in r["cot"]
    assert gsm8k.extract_answer(r["cot"]) == r["answer"]
  with open(os.path.join(d, "train.jsonl")) as f:
    for line in f:
      commas += "," in json.loads(line)["answer"].rsplit("####", 1)[1]
  assert commas == 79  # README: 79 train finals carry a thousands comma; all parsed above.
  assert gsm8k.load_split(d, "test", limit=5) == test[:5]


def _write(tmp_path, lines: list[bytes]) -> str:
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


GOOD_LINE = json.dumps(GOOD).encode()


@pytest.mark.parametrize("bad,what", [
    (b'{"question": "q", "answer": ', "JSON"),
    (json.dumps({"answer": SOLUTION}).encode(), "question"),
    (json.dumps({"question": "q"}).encode(), "answer"),
    (json.dumps({"question": "  ", "answer": SOLUTION}).encode(), "question"),
    (b'{"question": "caf\xe9", "answer": "#### 1"}', "UTF-8"),
    (json.dumps({"question": "q", "answer": "it is 5"}).encode(), "####"),
    (json.dumps({"question": "q", "answer": "#### five"}).encode(), "number"),
    (b"[1, 2]", "object"),
])
def test_bad_input_raises_with_path_and_line(tmp_path, bad, what):
  path = _write(tmp_path, [GOOD_LINE, b"", bad, GOOD_LINE])
  with pytest.raises(ValueError) as e:
    gsm8k.load_jsonl(path)
  msg = str(e.value)
  assert f"{path}:3" in msg and what in msg and "\n" not in msg


def test_skip_mode_counts(tmp_path, caplog):
  path = _write(tmp_path, [GOOD_LINE, b"{oops", b"", b"\xff\xfe", GOOD_LINE,
                           json.dumps({"question": "q", "answer": "no final"}).encode()])
  stats = {}
  with caplog.at_level(logging.WARNING):
    recs = gsm8k.load_jsonl(path, on_error="skip", stats=stats)
  assert [r["id"] for r in recs] == ["bad-1", "bad-5"]
  assert stats["skipped"] == 3
  assert any("skipped 3" in m for m in caplog.messages)
  with pytest.raises(ValueError, match="on_error"):
    gsm8k.load_jsonl(path, on_error="ignore")


def test_missing_dir_or_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.dir") as e:
    gsm8k.load_split(str(tmp_path / "nope"), "train")
  assert str(tmp_path / "nope") in str(e.value)
  with pytest.raises(FileNotFoundError, match="data.dir") as e:
    gsm8k.load_split(str(tmp_path), "test")
  assert str(tmp_path / "test.jsonl") in str(e.value)
  with pytest.raises(ValueError, match="split"):
    gsm8k.load_split(str(tmp_path), "dev")


def _seqio():
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio


def test_seqio_jsonl_task(tmp_path):
  seqio = _seqio()
  (tmp_path / "test.jsonl").write_text(
      json.dumps(GOOD) + "\n" + json.dumps({"question": "Two?", "answer": "1+1\n#### 2"}) + "\n")
  task = gsm8k.register_gsm8k_tasks("jsonl", str(tmp_path))
  assert seqio.get_mixture_or_task("gsm8k_jsonl") is task
  assert task.splits == ("validation",)
  ds = seqio.get_dataset("gsm8k_jsonl", {"inputs": 256, "targets": 256},
                         seqio.PassThroughFeatureConverter(), dataset_split="validation")
  exs = list(ds.as_numpy_iterator())
  assert [e["inputs_pretokenized"].decode() for e in exs] == ["Q: How many clips?\nA:",
                                                              "Q: Two?\nA:"]
  assert exs[1]["targets_pretokenized"].decode() == "1+1 The answer is 2."
  vocab = task.output_features["inputs"].vocabulary
  assert vocab.decode(exs[0]["inputs"].tolist()) == "Q: How many clips?\nA:"
  assert exs[0]["inputs"][-1] != vocab.eos_id and exs[0]["targets"][-1] == vocab.eos_id
  assert task.postprocess_fn(exs[0]["targets_pretokenized"].decode(), is_target=True) == "72"
  # Re-registration replaces the task.
  (tmp_path / "test.jsonl").write_text(json.dumps(GOOD) + "\n")
  gsm8k.register_gsm8k_tasks("jsonl", str(tmp_path))
  ds = seqio.get_mixture_or_task("gsm8k_jsonl").get_dataset(
      None, split="validation", shuffle=False)
  assert len(list(ds)) == 1


def test_seqio_jsonl_matches_python_gold_cot(shared_dir):
  """The TF preprocessor and `gold_cot` agree on every GSM8K test problem."""
  d = _gsm8k_dir(shared_dir)
  task = gsm8k.register_gsm8k_tasks("jsonl", d)
  assert set(task.splits) == {"train", "validation"}
  assert task.num_input_examples("validation") == 1319
  ds = task.get_dataset(None, split="validation", shuffle=False)
  recs = gsm8k.load_split(d, "test")
  got = [(e["inputs_pretokenized"].decode(), e["targets_pretokenized"].decode())
         for e in ds.as_numpy_iterator()]
  assert got == [(gsm8k.format_input(r["question"]), r["cot"]) for r in recs]


def test_register_errors(tmp_path):
  with pytest.raises(ValueError, match="data.dir"):
    gsm8k.register_gsm8k_tasks("jsonl")
  with pytest.raises(FileNotFoundError, match="data.dir"):
    gsm8k.register_gsm8k_tasks("jsonl", str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="data.dir"):
    gsm8k.register_gsm8k_tasks("jsonl", str(tmp_path))
  with pytest.raises(ValueError, match="source"):
    gsm8k.register_gsm8k_tasks("hf", str(tmp_path))


def test_tfds_mocked_random_examples():
  """Offline: seqio's TfdsDataSource over mock_data (needs try_in_mem_cache=False)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    task = gsm8k.register_gsm8k_tasks("tfds")
    ds = task.get_dataset({"inputs": 64, "targets": 64}, split="validation", shuffle=False,
                          try_in_mem_cache=False)
    exs = list(ds.as_numpy_iterator())
  assert len(exs) == 4
  for e in exs:
    assert e["inputs_pretokenized"].startswith(b"Q: ")
    assert e["inputs_pretokenized"].endswith(b"\nA:")
    assert e["targets"][-1] == 1  # EOS


def test_tfds_mocked_real_examples(shared_dir):
  """Offline: real GSM8K lines served through mocked TFDS give the JSONL records."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  recs = gsm8k.load_split(_gsm8k_dir(shared_dir), "test", limit=30)
  with open(os.path.join(_gsm8k_dir(shared_dir), "test.jsonl")) as f:
    raw = [json.loads(next(f)) for _ in range(30)]

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    return tf.data.Dataset.from_tensor_slices({
        "question": [r["question"] for r in raw], "answer": [r["answer"] for r in raw],
        "annotation": [""] * len(raw), "short_answer": [""] * len(raw)})

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset):
    got = gsm8k.load_tfds("test")
    task = gsm8k.register_gsm8k_tasks("tfds")
    exs = list(task.get_dataset(None, split="validation", shuffle=False,
                                try_in_mem_cache=False).as_numpy_iterator())
  assert [g["id"] for g in got[:2]] == ["tfds_test-0", "tfds_test-1"]
  assert got[3]["source"] == "TFDS gsm8k:1.0.0 split test, example 3"
  strip = lambda r: {k: v for k, v in r.items() if k not in ("id", "source")}
  assert [strip(g) for g in got] == [strip(r) for r in recs]
  assert [e["targets_pretokenized"].decode() for e in exs] == [r["cot"] for r in recs]


@pytest.mark.network
def test_tfds_real_download():
  test = gsm8k.load_tfds("test")
  assert len(test) == 1319
  assert all(str(int(r["answer"])) == r["answer"] for r in test)
