"""Weights & Biases beside TensorBoard: config checks, and an offline run's files."""
import glob
import json
import os
import struct
import sys
import time

import pytest

from lmsi_jax import config as config_lib
from lmsi_jax import model as model_lib
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import train as train_lib
from lmsi_jax import wandb_logger
from lmsi_jax.data import jsonl

sys.path.insert(0, os.path.dirname(__file__))
import train_worker as tw  # noqa: E402  pylint: disable=g-import-not-at-top

QUESTIONS = [
    {"id": "q1", "question": "What is 2 + 3?", "answer": "5"},
    {"id": "q2", "question": "What is 3 * 4?", "answer": "12"},
    {"id": "q3", "question": "What is 9 - 1?", "answer": "8"},
]
PATHS = {
    "q1": ["2 + 3 = 5. The answer is 5.", "The answer is 5.", "The answer is 6."],
    "q2": ["3 * 4 = 12. The answer is 12.", "I do not know.", "The answer is 12."],
    "q3": ["The answer is 8.", "The answer is 8.", "The answer is 8."],
}


def wandb_records(run_file: str) -> list:
  """The Records of an offline run's .wandb file (a ':W&B' header, then a LevelDB-style log
  of 32 KiB blocks of chunked protobuf Records)."""
  from wandb.proto import wandb_internal_pb2 as pb  # pylint: disable=g-import-not-at-top
  with open(run_file, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, block, buf, records = 7, 32768, b"", []
  while pos + 7 <= len(data):
    left = block - pos % block
    _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
    if left < 7 or (kind == 0 and n == 0):         # block trailer / zero padding
      pos += left
      continue
    chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
    buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record
    if kind in (1, 4) and len(chunk) == n:          # FULL/LAST end it (a torn tail is not one)
      rec = pb.Record()
      rec.ParseFromString(buf)
      records.append(rec)
  return records


def finished_records(run_file: str, timeout_s: float = 120.0) -> list:
  """The run file's Records once wandb's service process has written the run's `exit` record:
  run.finish() hands the records to that process, which may still be writing them out."""
  deadline = time.monotonic() + timeout_s
  while True:
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    if "exit" in kinds:
      return records
    assert time.monotonic() < deadline, f"{run_file}: no exit record after {timeout_s} s: {kinds}"
    time.sleep(0.5)


def history_rows(records) -> list[dict]:
  """The history Records as dicts, nested keys joined with '/'."""
  return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
          for r in records if r.WhichOneof("record_type") == "history"]


def _cfg(**wandb):
  c = config_lib.base_config()
  c.logging.wandb.update(wandb)
  return c


def _validate(c):
  """config.validate's checks for the logging group (the rest of base_config is not needed)."""
  def check(ok, key, msg):
    if not ok:
      raise ValueError(f"config.{key}={config_lib._get(c, key)!r}: {msg}")  # pylint: disable=protected-access
  wandb_logger.validate(c, check)


def test_config_keys_checked_up_front(monkeypatch):
  _validate(_cfg())                                   # off by default, no package needed
  assert wandb_logger.settings(_cfg()) is None
  with pytest.raises(ValueError, match=r"^config.logging.wandb.mode='bogus': expected one of"):
    _validate(_cfg(project="p", mode="bogus"))
  with pytest.raises(ValueError, match=r"^config.logging.wandb.table_questions=-1: must be >= 0"):
    _validate(_cfg(table_questions=-1))
  monkeypatch.setitem(sys.modules, "wandb", None)     # the package missing: one line
  with pytest.raises(ValueError, match=r"^config.logging.wandb.project='p': needs the wandb "
                                       r"package \(pip install wandb\)"):
    _validate(_cfg(project="p"))
  with pytest.raises(KeyError, match="unknown config key 'logging.wandb.projekt'"):
    config_lib.load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                             "configs", "demo.py"),
                                overrides={"logging.wandb.projekt": "p"})


def test_hooks_are_noops_without_a_session(tmp_path):
  assert not wandb_logger.active()
  wandb_logger.log_scalars("round_1/train", {"loss": 1.0}, 0)
  wandb_logger.log_round(_cfg(), str(tmp_path), {"round": 1, "greedy_acc": 0.5})
  with wandb_logger.session(_cfg(), str(tmp_path)) as run:   # no project: no run
    assert run is None and not wandb_logger.active()


def write_round(round_dir) -> tuple[list[dict], list[dict]]:
  """A round's files as rounds.sample_and_vote leaves them: samples/shard_*, votes, labels."""
  os.makedirs(os.path.join(round_dir, "samples"))
  samples = [{"id": q["id"], "question": q["question"],
              "samples": [{"text": t, "mean_logprob": -0.5, "num_tokens": 8, "stop_reason": "eos"}
                          for t in PATHS[q["id"]]]} for q in QUESTIONS]
  jsonl.write_jsonl_atomic(os.path.join(round_dir, "samples", "shard_00000.jsonl"), samples)
  labels, votes = pl.vote_pool(samples, QUESTIONS, pl.VoteSettings(), exemplars=None,
                               formats=("zero_shot_cot",), round_index=1, source_step=0)
  jsonl.write_jsonl_atomic(os.path.join(round_dir, "votes.jsonl"), votes)
  jsonl.write_jsonl_atomic(os.path.join(round_dir, "pseudo_labels.jsonl"), labels)
  return labels, votes


def test_offline_run_has_train_scalars_and_round_table(tmp_path, mesh8, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = tmp_path / "work"
  labels, votes = write_round(str(workdir / "round_1"))
  cfg = _cfg(project="lmsi-test", mode="offline", table_questions=2)
  summary = {"round": 1, "greedy_acc": 0.25, "sc_acc": 0.5, "pseudo_label_precision": 1.0,
             "pass_at_k": None, "calibration": {"ece": 0.1}, "wall_s": 3.0}
  with wandb_logger.session(cfg, str(workdir)) as run:
    assert wandb_logger.active()
    train_dir = str(workdir / "round_1" / "train")
    train_lib.train(model_lib.LM.init(model_lib.ModelConfig(**tw.CFG), mesh8),
                    tw.ArrayBatches(8, 32), train_lib.TrainConfig.from_dict(
                        {**tw.TCFG, "num_steps": 2, "checkpoint_every": 2}),
                    train_dir, desc="round_1/train")
    wandb_logger.log_round(cfg, str(workdir / "round_1"), summary)
    files = run.dir
  assert not wandb_logger.active()
  assert glob.glob(os.path.join(train_dir, "tb", "events.out.tfevents.*"))   # TensorBoard too
  assert str(tmp_path) in files and "offline-run-" in files

  (run_file,) = glob.glob(os.path.join(os.path.dirname(files), "run-*.wandb"))
  records = finished_records(run_file)
  hist = history_rows(records)
  train = [h for h in hist if "round_1/train/step" in h]
  assert [h["round_1/train/step"] for h in train] == [0, 1], (      # every step, as in TB
      [r.WhichOneof("record_type") for r in records], hist)
  for h in train:
    for k in ("loss", "grad_norm", "update_norm", "learning_rate", "tokens", "tokens_per_s"):
      assert isinstance(h[f"round_1/train/{k}"], (int, float)), k
  assert train[0]["round_1/train/loss"] != train[1]["round_1/train/loss"]
  (rnd,) = [h for h in hist if "round/index" in h]
  assert rnd["round/index"] == 1 and rnd["round/greedy_acc"] == 0.25 and rnd["round/sc_acc"] == 0.5
  assert rnd["round/wall_s"] == 3.0 and rnd["round/pseudo_label_precision"] == 1.0
  assert "round/pass_at_k" not in rnd and not any(k.startswith("round/calibration") for k in rnd)
  assert rnd["round_1/paths/_type"] == "table-file" and rnd["round_1/paths/nrows"] == 6

  with open(os.path.join(files, rnd["round_1/paths/path"])) as f:
    table = json.load(f)
  assert table["columns"] == list(wandb_logger.TABLE_COLUMNS)
  rows = [dict(zip(table["columns"], r)) for r in table["data"]]
  assert [(r["question_id"], r["path_index"]) for r in rows] == [
      (q, j) for q in ("q1", "q2") for j in range(3)]                 # table_questions=2
  kept = {(l["id"], l["path_index"]) for l in labels}
  assert {(r["question_id"], r["path_index"]) for r in rows if r["kept"]} == \
      {k for k in kept if k[0] != "q3"} == {("q1", 0), ("q1", 1), ("q2", 0), ("q2", 2)}
  by_id = {v["id"]: v for v in votes}
  for r in rows:
    v = by_id[r["question_id"]]
    assert (r["vote_answer"], r["vote_count"], r["vote_correct"]) == (v["answer"], v["count"],
                                                                      v["correct"])
    assert r["path"] == PATHS[r["question_id"]][r["path_index"]]
    assert r["question"] == QUESTIONS[int(r["question_id"][1]) - 1]["question"]
