"""Format ablation (LMSI Table 5) and round strategies: report contract, shared stages, formats.

Sampling is scripted (every path adds the terms correctly, in an order that
depends on the sample), so the test needs no trained model; training, voting,
formats, evaluation and the report are real.
"""
import json
import os
import re

import pytest

from lmsi_jax import config as config_lib
from lmsi_jax import modes
from lmsi_jax import testing
from lmsi_jax.data import jsonl
from lmsi_jax.data import synthetic

SETTINGS = {"no_cot": {"few_shot_direct", "zero_shot_direct"},
            "few_shot_cot_only": {"few_shot_cot"},
            "all_four": {"few_shot_cot", "few_shot_direct", "zero_shot_cot", "zero_shot_direct"}}


def tiny(c):
  """A demo study config cut to seconds."""
  c.base_train.enabled = False
  c.synthetic.update(seed_easy_n=40, seed_hard_n=4, pool_n=6, eval_n=6)
  c.sampling.update(num_samples=2, max_decode_steps=8)
  c.eval.update(num_samples=2, max_decode_steps=8)
  c.train.update(num_steps=2, batch_size=8, checkpoint_every=2)
  config_lib.validate(c)
  return c


def scripted_generate(prompts, settings, seed):
  """A correct chain of thought for the last question of each prompt, sample j rotated by j."""
  questions = [re.findall(r"Q: ([\d+]+)\n", p + "\n")[-1] for p in prompts]
  calls.append(questions)
  out = []
  for q in questions:
    terms = synthetic.parse_question(q)
    rows = []
    for j in range(settings.num_samples):
      order = terms[j % len(terms):] + terms[:j % len(terms)]
      rows.append(testing.Sample(" " + synthetic.cot_text(terms, order), (1,), (-0.1,), "eos"))
    out.append(rows)
  return out


calls = []


@pytest.fixture()
def scripted():
  """The study's runner, sampling through the script (injected, not patched)."""
  calls.clear()
  return lambda cfg, workdir: modes.build(cfg, workdir,
                                          sampler=testing.ScriptedSampler(scripted_generate))


def test_demo_variants_validate_and_dispatch(demo_config):
  fa, st = demo_config("format_ablation"), demo_config("strategy")
  for c in (fa, st):
    config_lib.validate(c)
    assert not c.eval.oracle and not c.eval.control
  assert fa.mode == "format_ablation" and st.mode == "strategies"
  assert modes.MODES[fa.mode] == "lmsi_jax.ablation:FormatAblation"
  assert fa.synthetic.num_exemplars == 2 and len(fa.formats) == 4
  assert fa.prompt_format == "few_shot_cot" and fa.train.seq_len >= 256
  main = demo_config(None)
  assert (st.rounds.num_rounds, st.sampling.num_samples) == (main.rounds.num_rounds,
                                                            main.sampling.num_samples)


@pytest.mark.slow
def test_format_ablation_report_contract(tmp_path, scripted, demo_config):
  workdir = str(tmp_path)
  rep = scripted(tiny(demo_config("format_ablation_smoke")), workdir).run()
  with open(os.path.join(workdir, "report.json")) as f:
    assert json.load(f)["format_ablation"] == rep["format_ablation"]
  fa = rep["format_ablation"]
  assert set(fa) == set(SETTINGS)
  for name, formats in SETTINGS.items():
    v = fa[name]
    for k in ("greedy_acc", "sc_acc", "direct_greedy_acc"):
      assert 0.0 <= v[k] <= 1.0
    assert set(v["formats"]) == formats and v["num_rounds"] == 1
    labels = jsonl.read_jsonl(os.path.join(workdir, name, "round_1", "pseudo_labels.jsonl"))
    assert {l["format"] for l in labels} == formats
    assert len(labels) == v["num_records"] == 6 * 2 * len(formats)   # 6 questions x 2 paths
    assert not os.path.exists(os.path.join(workdir, name, "round_1", "samples"))
    assert os.path.exists(os.path.join(workdir, name, "round_1", "train", "done.json"))
  pool = {q["question"] for q in synthetic.build_splits(seed=0, seed_easy_n=40, seed_hard_n=4,
                                                      pool_n=6, eval_n=6)["pool"]}
  assert sum(bool(pool & set(qs)) for qs in calls) == 1        # the pool is sampled once
  assert len(os.listdir(os.path.join(workdir, "round_1", "samples"))) == 1
  assert rep["base"]["greedy_acc"] == 1.0 and rep["base"]["direct_greedy_acc"] == 1.0
  with open(os.path.join(workdir, "report.md")) as f:
    md = f.read()
  assert "## Format ablation (LMSI Table 5)" in md and "| few_shot_cot_only | few_shot_cot | 1 |" in md
  # a re-run reads every stage back and samples nothing
  calls.clear()
  again = scripted(tiny(demo_config("format_ablation_smoke")), workdir).run()
  assert calls == [] and again["format_ablation"] == rep["format_ablation"]


@pytest.mark.slow
def test_strategies_share_round_one(tmp_path, scripted, demo_config):
  workdir = str(tmp_path)
  rep = scripted(tiny(demo_config("strategy_smoke")), workdir).run()
  st = rep["strategies"]
  assert set(st) == {"continue", "restart"}
  for name in st:
    assert st[name]["init"] == name and [r["round"] for r in st[name]["rounds"]] == [1, 2]
    assert 0.0 <= st[name]["greedy_acc"] <= 1.0 and 0.0 <= st[name]["sc_acc"] <= 1.0
  assert st["continue"]["rounds"][0] == st["restart"]["rounds"][0]
  assert not os.path.exists(os.path.join(workdir, "restart", "round_1"))
  assert os.path.exists(os.path.join(workdir, "restart", "round_2", "train", "done.json"))
  assert rep["rounds"][1]["greedy_acc"] == st["continue"]["greedy_acc"]   # main rows: continue
