"""The command line's error contract and the package's data files."""
import ast
import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMD = [sys.executable, "-m", "lmsi_jax.main", "--config=configs/demo.py:smoke"]


def _run(tmp_path, *extra, env=None):
  e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  e.update(env or {})
  return subprocess.run(CMD + [f"--workdir={tmp_path}", "--seeds=0-x", *extra], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra,env,traceback", [
    ((), {}, False), (("--debug",), {}, True), ((), {"LMSI_DEBUG": "1"}, True)])
def test_user_errors_are_one_line_unless_debug(tmp_path, extra, env, traceback):
  p = _run(tmp_path, *extra, env=env)
  assert p.returncode != 0
  want = "--seeds='0-x': expected seeds like '0-4' or '0,1,2', got '0-x'"
  if traceback:
    assert "Traceback" in p.stderr and want in p.stderr, p.stderr[-2000:]
  else:
    assert p.returncode == 2
    assert [l for l in p.stderr.splitlines() if l.startswith("lmsi_jax:")] == [
        f"lmsi_jax: error: {want}"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_setup_declares_the_prompt_files():
  """A non-editable install carries lmsi_jax/prompts/*.txt (read by problems/formats)."""
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "id", "") == "setup")
  data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
  declared = {os.path.relpath(f, os.path.join(REPO, "lmsi_jax"))
              for pat in data["lmsi_jax"] for f in glob.glob(os.path.join(REPO, "lmsi_jax", pat))}
  txt = {os.path.relpath(f, os.path.join(REPO, "lmsi_jax"))
         for f in glob.glob(os.path.join(REPO, "lmsi_jax", "prompts", "*.txt"))}
  assert txt and txt <= declared


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_family_configs_are_the_gsm8k_checkpoint_variant(family):
  """configs/<family>.py:PATH is configs/gsm8k.py:checkpoint:PATH; without a PATH the
  config is refused with one line naming model.checkpoint."""
  from lmsi_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, "configs", f"{family}.py")
  c = config_lib.load_config_file(path, "/ckpt/x")
  assert (c.model.checkpoint, c.model.preset, c.model.max_seq_len, c.train.remat) == (
      "/ckpt/x", "", 2048, "full")
  gsm8k = config_lib.load_config_file(os.path.join(REPO, "configs", "gsm8k.py"),
                                      "checkpoint:/ckpt/x")
  assert c.to_dict() == gsm8k.to_dict()
  with pytest.raises(ValueError, match=r"^config\.model\.checkpoint") as e:
    config_lib.validate(config_lib.load_config_file(path))
  assert "\n" not in str(e.value)
