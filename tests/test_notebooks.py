"""The notebooks run headless, top to bottom, at their reduced size (nbclient, python3 kernel)."""
import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
CELL_TIMEOUT = 600
# The smoke demo with one round and no control arm (every cell still runs); its weak model
# rarely writes "The answer is N", so votes fall back to the last number: there are samples to show.
SMOKE_TRIM = {"rounds.num_rounds": 1, "eval.control": False, "voting.fallback_last_number": True}
# One CPU device in the kernel (what a laptop or Colab CPU has): faster than 8 fake ones.
KERNEL_ENV = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _execute(name: str, **env) -> nbformat.NotebookNode:
  """Runs notebooks/<name> in a fresh kernel (cwd = repo root) with `env` added."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      f"{name} is stored with outputs: clear them"
  env = {**KERNEL_ENV, **env}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)   # the kernel inherits the environment (conftest: 8 CPU devices)
  try:
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    client.execute()       # raises CellExecutionError naming the cell on any error
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def _text(nb) -> str:
  out = []
  for c in nb.cells:
    for o in c.get("outputs", []):
      out.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
  return "\n".join(out)


@pytest.mark.slow
def test_lmsi_demo_notebook(tmp_path):
  workdir = str(tmp_path / "demo")
  nb = _execute("lmsi_demo.ipynb", LMSI_NOTEBOOK_SIZE="smoke", LMSI_NOTEBOOK_WORKDIR=workdir,
                LMSI_NOTEBOOK_OVERRIDES=json.dumps(SMOKE_TRIM))
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert report["config"]["synthetic"]["pool_n"] == 64                 # the smoke variant
  assert report["config"]["guard"]["probe_n"] == 16 and report["rounds"][0]["num_questions"] == 48
  assert len(report["rounds"]) == 1 and report["control"] is None
  # the arms train as many rounds as the kept model had (none when the guard kept stage 0)
  assert (report["oracle"] is not None) == (report["final"]["round"] == 1)
  assert report["rounds"][0]["num_pseudo_labels"] > 0
  text = _text(nb)
  assert "round 1: greedy=" in text and "majority answer" in text and "[kept]" in text
  assert "guard 0: vote share" in text and "guard 1: vote share" in text
  assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) == 2


@pytest.mark.slow
def test_bring_your_checkpoint_notebook(tmp_path):
  workdir = str(tmp_path / "byoc")
  nb = _execute("bring_your_checkpoint.ipynb", LMSI_NOTEBOOK_WORKDIR=workdir,
                LMSI_NOTEBOOK_CHECKPOINT="", LMSI_NOTEBOOK_SMOLLM2="0")
  assert os.path.exists(os.path.join(workdir, "lmsi", "report.json"))
  export = os.path.join(workdir, "export_hf")
  assert os.path.exists(os.path.join(export, "config.json"))
  assert os.path.exists(os.path.join(export, "tokenizer.json"))
  text = _text(nb)
  assert "majority vote:" in text
  assert "max |logit difference|" in text or "skipped the reload check" in text
