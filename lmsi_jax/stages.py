"""The stages of a run: functions of a RunContext that return typed results.

Each stage asks the store whether it is done (then reads its output back),
else records its start, does its work, writes its outputs atomically and
records them (lmsi_jax/store.py). A stage never assigns to the context; the
models and tasks it produces are noted in the context's lineage so the stages
that read them record what they came from.

To add a stage: write its function here (its fingerprint keys beside the
others in context.py, or here) and call it from the runner that needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lmsi_jax import distributed
from lmsi_jax import evaluate as eval_lib
from lmsi_jax import fileio
from lmsi_jax import guard as guard_lib
from lmsi_jax import lora as lora_lib
from lmsi_jax import problems
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import results
from lmsi_jax import seeds
from lmsi_jax import train as train_lib
from lmsi_jax.context import (ARMS, BASE_TRAIN_EXCLUDE, BASE_TRAIN_KEYS, EVAL_EXCLUDE,  # noqa
                              EVAL_KEYS, PROBE_KEYS, SAMPLE_KEYS, SEED_KEYS, TRAIN_KEYS,
                              VOTE_KEYS, RunContext, ids_hash)
from lmsi_jax.data import features
from lmsi_jax.data import jsonl
from lmsi_jax.data import tasks


def labels_stage(ctx: RunContext, path: str, make_records, task_name: str, extra=None):
  """A stage writing gold-labelled records (oracle labels, w2s data) and its task."""
  st = ctx.stage(path, SEED_KEYS, inputs=[ctx.exemplar_stage()], extra=extra)
  recs = None
  if not st.done:
    st.begin(path)
    recs = make_records()
  task = ctx.register(task_name, path, recs, stage=st.name)
  if not st.done:
    st.finish(path)
  return task


def seed_data(ctx: RunContext):
  """The labeled seed data (if the task has any) as a SeqIO task (None without any)."""
  if not ctx.problem.seed:
    return None
  path = ctx.path("data", "seed.jsonl")
  st = ctx.stage(path, SEED_KEYS)      # the seed data keeps the task's own exemplars
  recs = None
  if not st.done:
    st.begin(path)
    recs = pl.gold_records(ctx.problem.seed, exemplars=ctx.problem.exemplars,
                           formats=ctx.cfg.formats, round_index=0)
  task = ctx.register(tasks.seed_task_name(ctx.problem.name), path, recs, stage=st.name)
  if not st.done:
    st.finish(path)
  return task


def train(ctx: RunContext, lm, mixture, out_dir: str, *, base: bool = False, data_seed: int = 0,
          loss_fn=None, extra_keys: tuple[str, ...] = ()):
  """Fine-tunes a copy of `lm` on `mixture` into out_dir (resumes from its checkpoints)."""
  tcfg = ctx.train_config(base)
  lcfg = lora_lib.LoraConfig() if base else lora_lib.LoraConfig.from_config(ctx.cfg.train.lora)
  keys, exclude = ((BASE_TRAIN_KEYS, BASE_TRAIN_EXCLUDE) if base
                   else (TRAIN_KEYS + tuple(extra_keys), () if lcfg.enabled else ("train.lora",)))
  st = ctx.stage(out_dir, keys, exclude=exclude,
                 inputs=[ctx.origin(lm), *ctx.task_stages(mixture)],
                 extra={"data_seed": data_seed})
  if not st.done:
    st.begin(out_dir)
  batches = features.GlobalBatches(
      mixture, tcfg.seq_len, tcfg.batch_size, seed=data_seed,
      num_shards=ctx.cfg.train.data_shards, process_index=jax.process_index(),
      process_count=jax.process_count(), num_batches=tcfg.num_steps)
  if lcfg.enabled:    # only the adapters are trained (and donated); sample with them merged
    lm = lora_lib.apply(lm, lcfg, ctx.cfg.seed)
  else:     # train() donates its input state; the base model is reused by later stages.
    lm = dataclasses.replace(lm, state=jax.tree.map(lambda x: x.copy(), lm.state))
  lm = train_lib.train(lm, batches, tcfg, out_dir, config_json=ctx.cfg.to_json(),
                       desc=os.path.relpath(out_dir, ctx.workdir), loss_fn=loss_fn)
  if lcfg.enabled:
    lm = lora_lib.merge(lm)
  cut = batches.truncated
  if jax.process_count() > 1:
    cut = int(np.sum(multihost_utils.process_allgather(np.array([cut]))))
  if cut:
    logging.warning("%s: %d training example(s) were longer than train.seq_len=%d and lost "
                    "their end (the answer) to truncation; raise train.seq_len",
                    os.path.relpath(out_dir, ctx.workdir), cut, tcfg.seq_len)
  if not st.done:
    done = os.path.join(out_dir, "done.json")
    wall_s = st.elapsed()
    distributed.write_json(done, {"wall_s": wall_s, "num_steps": tcfg.num_steps,
                                  "num_truncated": cut})
    st.finish(done, wall_s=wall_s)
  ctx.made(lm, st.name)
  return lm


def _eval_stage(ctx: RunContext, lm, out_path: str, temperature: float, seed_offset: int):
  rel = os.path.relpath(out_path, ctx.workdir)
  base = rel == os.path.join("base", "eval.json")
  exclude = EVAL_EXCLUDE + (("eval.temperature",) if base else ("eval.base_temperature",))
  keys = EVAL_KEYS
  if os.path.dirname(rel) in ARMS:     # an arm trains as many rounds as the kept LMSI model
    keys += ("rounds.num_rounds", "rounds.early_stop_patience", "guard")
  return ctx.stage(out_path, keys, exclude=exclude,
                   inputs=[ctx.origin(lm), ctx.exemplar_stage()],
                   extra={"temperature": temperature, "seed_offset": seed_offset})


def evaluate(ctx: RunContext, lm, out_path: str, temperature: float,
             seed_offset: int) -> results.EvalResult:
  """Greedy and self-consistency accuracy of `lm` on the eval set (cached in out_path)."""
  st = _eval_stage(ctx, lm, out_path, temperature, seed_offset)
  if st.done:
    return results.EvalResult.from_dict(fileio.read_json(out_path))
  st.begin(out_path)
  qs = ctx.problem.eval
  s = ctx.eval_settings(temperature)
  name = os.path.basename(os.path.dirname(out_path))
  with tqdm(total=len(qs) * (1 + s.num_samples), desc=f"eval {name}",
            disable=not distributed.is_main_process(), mininterval=2) as bar:
    res = eval_lib.evaluate(ctx.sampler_for(lm), qs, ctx.prompts(qs), s,
                            seed=ctx.eval_seed(seed_offset), progress=bar.update)
  res["wall_s"] = st.elapsed()
  distributed.write_json(out_path, res)
  st.finish(out_path, wall_s=res["wall_s"])
  return results.EvalResult.from_dict(res)


def sample(ctx: RunContext, lm, questions, out_dir: str, seed: int, progress=None) -> list[dict]:
  """`config.sampling.num_samples` paths per question, sharded and resumable under out_dir."""
  return pl.sample_pool(ctx.sampler_for(lm), questions, ctx.prompts(questions), out_dir,
                        ctx.sampling, seed=seed,
                        questions_per_shard=ctx.cfg.sampling.questions_per_shard,
                        progress=progress)


def _vote_stage(ctx: RunContext, rdir: str, sst, r: int, source_step: int):
  return ctx.stage(os.path.join(rdir, "vote"), VOTE_KEYS,
                   inputs=[sst.name, ctx.exemplar_stage()],
                   extra={"round": r, "source_step": source_step})


def sample_and_vote(ctx: RunContext, lm, r: int, source_step: int,
                    questions=None) -> results.VoteSummary:
  """Stages sample → vote → pseudo-labels for round r (default questions: the pool)."""
  rdir = ctx.path(f"round_{r}")
  c, qs = ctx.cfg, ctx.problem.pool if questions is None else questions
  gen = ctx.store.name_of(os.path.join(rdir, "selfgen")) if c.selfgen.questions else None
  samples_dir, seed = ctx.path(f"round_{r}", "samples"), ctx.sample_seed(r)
  sst = ctx.stage(samples_dir, SAMPLE_KEYS, inputs=[ctx.origin(lm), ctx.exemplar_stage(), gen],
                  extra={"sample_seed": seed, "questions": ids_hash(qs)})
  if not sst.done:
    sst.begin(samples_dir)
  vst = None
  outs = [os.path.join(rdir, n) for n in ("votes.jsonl", "pseudo_labels.jsonl",
                                         "vote_summary.json")]
  if sst.done:
    vst = _vote_stage(ctx, rdir, sst, r, source_step)
    if vst.done:
      return results.VoteSummary.from_dict(fileio.read_json(outs[2]))
  with tqdm(total=len(qs) * ctx.sampling.num_samples, desc=f"sample round {r}",
            disable=not distributed.is_main_process() or sst.done, mininterval=2) as bar:
    samples = sample(ctx, lm, qs, samples_dir, seed, progress=bar.update)
  if not sst.done:
    shards = [os.path.join(samples_dir, f) for f in fileio.listdir(samples_dir)
              if f.startswith("shard_")] if distributed.is_main_process() else []
    sst.finish(*shards)
    vst = _vote_stage(ctx, rdir, sst, r, source_step)
  vst.begin(*outs)
  labels, votes = pl.vote_pool(samples, qs, ctx.vote_settings, exemplars=ctx.problem.exemplars,
                               formats=c.formats, round_index=r, source_step=source_step)
  if not labels:
    logging.warning("round %d: voting kept no path (no parseable answer in any sample); "
                    "the round trains on the rest of its mixture", r)
  if distributed.is_main_process():
    jsonl.write_jsonl_atomic(outs[0], votes)
    jsonl.write_jsonl_atomic(outs[1], labels)
  summary = pl.summarize_votes(votes, c.eval.calibration_bins)
  summary.update(num_records=len(labels), sample_wall_s=ctx.store.wall_s([sst.name]),
                 vote_wall_s=vst.elapsed(),
                 sampled_tokens=int(sum(x.get("num_tokens", 0) for rec in samples
                                        for x in rec["samples"])))
  distributed.write_json(outs[2], summary)
  vst.finish(*outs, wall_s=summary["vote_wall_s"])
  return results.VoteSummary.from_dict(summary)


def probe(ctx: RunContext, lm, r: int, previous: dict | None) -> dict:
  """Collapse-guard signals of `lm` (round r; 0 = stage 0) on the held-out unlabeled probe."""
  rdir = ctx.path(f"round_{r}" if r else "base")
  out_path, samples_dir = os.path.join(rdir, "probe.json"), os.path.join(rdir, "probe_samples")
  seed = seeds.stream(ctx.cfg.seed, "probe", r)
  prev_stage = ctx.stage_name(f"round_{r - 1}" if r > 1 else "base", "probe.json") if r else None
  st = ctx.stage(out_path, PROBE_KEYS, inputs=[ctx.origin(lm), ctx.exemplar_stage(), prev_stage],
                 extra={"sample_seed": seed, "questions": ids_hash(ctx.problem.probe)})
  if st.done:
    return fileio.read_json(out_path)
  st.begin(samples_dir, out_path)
  qs = ctx.problem.probe
  with tqdm(total=len(qs) * ctx.sampling.num_samples, desc=f"probe {r}",
            disable=not distributed.is_main_process(), mininterval=2) as bar:
    samples = sample(ctx, lm, qs, samples_dir, seed, progress=bar.update)
  voted = [pl.vote_record(rec, ctx.vote_settings) for rec in samples]
  sig = guard_lib.probe_signals([a for *_, a in voted], [t for t, *_ in voted],
                                previous and previous["majorities"])
  sig["wall_s"] = st.elapsed()
  distributed.write_json(out_path, sig)
  st.finish(out_path, wall_s=sig["wall_s"])
  return sig


def mixture(ctx: RunContext, seed_task, arm: str, r: int, round_tasks: list):
  """Round r's training mixture: latest labels, earlier rounds, seed data."""
  rc = ctx.cfg.rounds
  parts = []
  if round_tasks and rc.pseudo_weight > 0:
    parts.append((round_tasks[-1], rc.pseudo_weight))
  if len(round_tasks) > 1 and rc.previous_weight > 0:
    parts += [(t, rc.previous_weight / (len(round_tasks) - 1)) for t in round_tasks[:-1]]
  if seed_task is not None and (rc.seed_weight > 0 or not parts):
    parts.append((seed_task, rc.seed_weight or 1.0))
  if not parts:
    raise ValueError(f"round {r} ({arm}): nothing to train on: no pseudo-labels (no sample "
                     "reached an answer; see round_*/vote_summary.json) and no seed data, or "
                     "rounds.pseudo_weight and rounds.seed_weight are both 0")
  return ctx.register_mixture(f"lmsi_{ctx.problem.name}_{arm}_round_{r}_mix", parts)


def oracle_labels(ctx: RunContext, r: int):
  """The oracle arm's round-r labels: gold CoT for the same pool."""
  return labels_stage(
      ctx, ctx.path("oracle", f"round_{r}", "labels.jsonl"),
      lambda: pl.gold_records(
          problems.with_gold_cot(ctx.problem, ctx.problem.pool,
                                 seed=seeds.stream(ctx.cfg.seed, "gold_cot", r)),
          exemplars=ctx.problem.exemplars, formats=ctx.cfg.formats, round_index=r),
      f"lmsi_{ctx.problem.name}_oracle_round_{r}",
      extra={"round": r, "questions": ids_hash(ctx.problem.pool)})


def spurious_labels(ctx: RunContext, r: int):
  """The spurious arm's round-r labels (a SeqIO task) from LMSI's round-r samples."""
  path = ctx.path("spurious", f"round_{r}", "labels.jsonl")
  st = ctx.stage(path, VOTE_KEYS, inputs=[ctx.stage_name(f"round_{r}", "samples")],
                 extra={"round": r})
  recs = None
  if not st.done:
    st.begin(path)
    recs = pl.spurious_pool(pl.read_samples(ctx.path(f"round_{r}", "samples")),
                            ctx.vote_settings, seed=seeds.stream(ctx.cfg.seed, "spurious"),
                            exemplars=ctx.problem.exemplars, formats=ctx.cfg.formats,
                            round_index=r, source_step=0)
  task = ctx.register(f"lmsi_{ctx.problem.name}_spurious_round_{r}", path, recs, stage=st.name)
  if not st.done:
    st.finish(path)
  return task
