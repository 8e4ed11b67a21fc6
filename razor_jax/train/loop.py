"""Fine-tuning with Back Razor (a ViT or a CNN): `run(config, workdir)`, the loop and evaluation.

`run` is everything `experiments/finetune.py` does. A run is a function of its config:
the data order, dropout keys and initialization depend only on the seed and the step,
so rerunning with the same workdir resumes from the last checkpoint and reaches the
same parameters as an uninterrupted run. Set-up pieces live in razor_jax.train.setup.
"""
from __future__ import annotations

import json
import math
import signal
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from razor_jax.memory import compiled_memory, device_peak_bytes
from razor_jax.train import checkpoint, sharding
from razor_jax.train import workdir as workdir_checks
from razor_jax.train import config as train_config
from razor_jax.train.metrics import MetricsLog, Progress, Throughput
from razor_jax.train.setup import (
    CheckpointMissingError, CheckpointUnreadableError, ConfigError, NonFiniteLossError, UserError, build_model,
    check_config, check_init_path, compile_step, init_state, jit_eval_step)

__all__ = ["CheckpointMissingError", "CheckpointUnreadableError", "ConfigError",
           "NonFiniteLossError", "UserError", "evaluate", "preflight", "run"]


def _say(line: str):
  """A line on stdout from process 0 (before the progress bar exists)."""
  if jax.process_index() == 0:
    print(line, flush=True)


def _gib(n: Optional[int]) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_step, variables, datasets, config, mesh) -> dict:
  """Top-1 accuracy and loss over the whole eval split (padding masked out).

  `variables`: TrainState.variables (the params, and a CNN's batch statistics).
  """
  totals = None
  batches = datasets.eval_batches(
      config.dataset, batch_size=config.eval_batch_size or config.batch_size,
      image_size=config.image_size, data_dir=config.data_dir or None,
      manual_dir=config.manual_dir or None)
  for local in batches:
    sums = eval_step(variables, sharding.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ConfigError(f"the eval split of {config.dataset!r} is empty")
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"eval/accuracy": float(totals["correct"]) / count,
          "eval/loss": float(totals["loss_sum"]) / count,
          "eval/examples": int(totals["count"])}


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """SIGTERM asks for a save and a stop; across processes, at a step all of them agree on.

  One process: a Python handler sets a flag. Several: jax.distributed's preemption
  notifier owns SIGTERM (a Python handler would take it away), tells the coordinator,
  and reached_preemption_sync_point turns true in every process at the same step, so
  a SIGTERM to any one process makes all of them save that step and stop.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _default_datasets():
  # TensorFlow comes with the data pipelines: imported here, once a run needs data.
  from razor_jax import data  # pylint: disable=g-import-not-at-top
  return data


def _check_finite(step: int, metrics: dict, config, last_saved: Optional[int],
                  ckpt_dir: str):
  bad = {k: v for k, v in metrics.items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
  if bad:
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}"
            if last_saved is not None else "no checkpoint had been saved yet")
    raise NonFiniteLossError(
        f"training diverged at step {step}: " + ", ".join(f"{k} = {v}" for k, v in bad.items())
        + f"; {kept}. Lower --config.lr (now {config.lr}) or --config.grad_clip_norm (now"
        f" {config.grad_clip_norm}), or check the input data, then rerun: the same workdir"
        " resumes from that checkpoint")


def run(config, workdir: str, *, datasets: Any = None,
        stop_at_step: Optional[int] = None) -> dict:
  """Fine-tunes as `config` says, checkpointing into `workdir`; resumes if it holds one.

  Args:
    config: a ConfigDict or dict; missing fields take razor_jax.train.config's defaults.
    workdir: checkpoints/, metrics.jsonl, tensorboard/ and config.json go here.
    datasets: the data API (num_classes, train_batches, eval_batches); default
      razor_jax.data. Tests pass small in-memory ones.
    stop_at_step: stop after this step with a checkpoint, as a preemption would.

  Returns:
    The last metrics: "step", "train/loss", "train/accuracy", "eval/accuracy",
    "eval/loss", "preempted", and the compiled peak bytes of the step.
  """
  config, changes = preflight(config, workdir)
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_config(config, mesh.size)
  finished = _finished(config, workdir)
  if finished is not None:
    return finished
  datasets = datasets or _default_datasets()
  num_classes = _prepare_data(config, datasets)
  ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints,
                                 async_save=config.async_checkpointing)
  try:
    return _run(config, workdir, mesh, ckpts, datasets, num_classes, changes, stop_at_step)
  finally:
    ckpts.close()


def preflight(config, workdir: str) -> tuple[Any, dict]:
  """(complete config, allowed changes) after the checks that need no device and no data.

  A bad workdir, a config that changes what the workdir's checkpoint was made under, or
  an unreadable init_path ends here within seconds, before anything is compiled or
  TensorFlow is imported, and with nothing written. Then the processes of a multi-process
  run join (sharding.initialize_distributed) and check that they run the same config.
  The CLI calls it first; it may run twice (the second call finds everything done).
  """
  try:
    config = train_config.complete(config)
  except KeyError as e:
    raise ConfigError(e.args[0]) from None
  workdir_checks.check_writable(workdir)
  resuming = checkpoint.has_checkpoint(workdir)
  changes = workdir_checks.check_config_unchanged(config, workdir) if resuming else {}
  if config.init_path and not resuming:
    check_init_path(config.init_path, config.model.name)
  joined_before = sharding.distributed_started()
  if sharding.initialize_distributed():
    _check_same_config(config, workdir)
    if not joined_before:
      _say(f"{jax.process_count()} processes joined: {jax.device_count()} devices,"
           f" {jax.local_device_count()} in each")
  return config, changes


def _check_same_config(config, workdir: str):
  """Raises ConfigError unless every process runs the same config and workdir."""
  if jax.process_count() == 1:
    return
  mine = json.dumps({"config": json.loads(config.to_json()), "workdir": workdir})
  for index, theirs in enumerate(sharding.exchange("config", mine)):
    if theirs is None:
      raise ConfigError(f"process {index} did not send its config within 60 s; it failed or"
                        " hangs (see its output)")
    if theirs != mine:
      differ = workdir_checks.config_changes(json.loads(mine), json.loads(theirs))
      raise ConfigError(
          f"process {index} runs another config than process {jax.process_index()}: "
          + ", ".join(f"{k} ({b!r} vs {a!r})" for k, (a, b) in differ.items())
          + "; start every process with the same flags")


def _finished(config, workdir) -> Optional[dict]:
  """The result of a run that already reached total_steps, read from its files (no compile)."""
  steps = checkpoint.intact_steps(workdir)
  if not steps or steps[-1] < config.total_steps:
    return None
  step = steps[-1]
  result = {"step": step, "preempted": False}
  line = f"already at step {step}/{config.total_steps}"
  evals = [row for row in MetricsLog.read(workdir) if "eval/accuracy" in row]
  if evals:
    result.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")})
    line += (f": eval accuracy {result['eval/accuracy']:.4f} (step {evals[-1]['step']});"
             " raise --config.total_steps to train on")
  _say(line)
  return result


def _prepare_data(config, datasets) -> int:
  """The number of classes; fails now, saying what to do, if the dataset is missing."""
  try:
    num_classes = datasets.num_classes(config.dataset, data_dir=config.data_dir or None)
  except ValueError as e:  # an unknown dataset name
    raise ConfigError(str(e)) from None
  prepare = getattr(datasets, "prepare", None)
  if prepare is not None:
    prepare(config.dataset, config.data_dir or None, config.manual_dir or None,
            multi_host=jax.process_count() > 1)
  return num_classes


def _report_memory(config, model, dense_model, compiled, mesh) -> dict:
  """Prints the compiled peak of the step, beside full fine-tuning's when it differs."""
  try:
    memory = compiled_memory(compiled)
  except RuntimeError:  # a backend without memory analysis
    return {}
  report = {"peak_bytes": memory.peak_bytes}
  line = (f"compiled peak memory of one train step, per device: {_gib(memory.peak_bytes)}"
          f" (prune_ratio {config.prune_ratio})")
  if config.memory_report and model != dense_model:
    full = compiled_memory(compile_step(dense_model, config, mesh)[2])
    report["full_finetuning_peak_bytes"] = full.peak_bytes
    line += (f" vs {_gib(full.peak_bytes)} for full fine-tuning (prune_ratio 0):"
             f" {full.peak_bytes / max(memory.peak_bytes, 1):.2f}x less")
  _say(line)
  return report


def _run(config, workdir, mesh, ckpts, datasets, num_classes, changes, stop_at_step):

  model = build_model(config, num_classes)
  # The forward pass is the same dense computation at any prune ratio: evaluate with the
  # plain model, which skips packing residuals that no backward pass would read.
  dense_model = build_model(config, num_classes, full_finetuning=True)
  tx, abstract, compiled = compile_step(model, config, mesh)
  log = MetricsLog(workdir)
  memory = _report_memory(config, model, dense_model, compiled, mesh)
  log.write(0, {f"memory/{k}": v for k, v in memory.items()})

  resume_step, state = ckpts.restore_latest(abstract, say=_say)
  if jax.process_index() == 0:
    if changes:
      _say("changed since the last run in this workdir (recorded in"
           f" {workdir_checks.CHANGES_FILE}): " + ", ".join(
               f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    workdir_checks.record_config(config, workdir, changes, resume_step)
  if resume_step is not None:
    _say(f"resuming from the checkpoint of step {resume_step} in {ckpts.directory}")
  else:
    rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    state = init_state(model, tx, config, mesh, shardings, rng)
    _say("starting from " + (config.init_path or "scratch (random initialization)"))

  loop = _Loop(config, mesh, ckpts, datasets, log, jit_eval_step(dense_model, mesh),
               last_saved=resume_step)
  try:
    result = loop.run(compiled, state, stop_at_step)
  finally:
    log.close()
  result.update(memory)
  peak = device_peak_bytes()
  if peak is not None:
    result["device_peak_bytes"] = peak
    _say(f"device peak bytes in use: {_gib(peak)}")
  if result["preempted"]:
    _say(f"stopped at step {result['step']} with a checkpoint; rerun with the same workdir"
         " to resume")
  return result


class _Loop:
  """The steps from the state's step to config.total_steps, and what happens between them.

  Each step's metrics are read one step late, while the next step runs, so the host
  never waits for the device except before a log line, a checkpoint or an evaluation;
  a non-finite loss or gradient is caught before the state after it is ever saved.
  """

  def __init__(self, config, mesh, ckpts, datasets, log, eval_step, last_saved):
    self.config, self.mesh, self.ckpts, self.datasets, self.log = config, mesh, ckpts, datasets, log
    self.eval_step = eval_step
    self.last_saved = last_saved
    self.pending = None  # (step, device metrics) not yet read
    self.window = []  # host metrics since the last log line
    self.throughput = Throughput()
    self.progress = None

  def settle(self):
    """Reads the pending metrics; raises NonFiniteLossError if they are not finite."""
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, host, self.config, self.last_saved, self.ckpts.directory)
    self.window.append(host)
    self.throughput.add(self.config.batch_size)
    self.progress.update(1, loss=f"{host['loss']:.4f}", acc=f"{host['accuracy']:.3f}")

  def log_train(self, step: int) -> dict:
    row = {f"train/{k}": float(np.mean([m[k] for m in self.window])) for k in self.window[0]}
    row["train/images_per_second"] = self.throughput.rate()
    self.window.clear()
    self.log.write(step, row)
    self.progress.update(0, **{"img/s": f"{row['train/images_per_second']:.1f}"})
    return row

  def evaluate(self, step: int, variables) -> dict:
    row = evaluate(self.eval_step, variables, self.datasets, self.config, self.mesh)
    self.log.write(step, row)
    self.progress.print(f"step {step}/{self.config.total_steps}: eval accuracy"
                        f" {row['eval/accuracy']:.4f} ({row['eval/examples']} examples),"
                        f" eval loss {row['eval/loss']:.4f}")
    return row

  def run(self, compiled, state, stop_at_step) -> dict:
    config = self.config
    start, total = int(jax.device_get(state.step)), config.total_steps
    result = {"step": start, "preempted": False}
    if start >= total:
      result.update(evaluate(self.eval_step, state.variables, self.datasets, config, self.mesh))
      _say(f"already at step {start}/{total}: eval accuracy {result['eval/accuracy']:.4f}")
      return result
    rng = sharding.replicated_key(jax.random.fold_in(jax.random.key(config.seed), 1), self.mesh)
    batches = iter(self.datasets.train_batches(
        config.dataset, batch_size=config.batch_size, image_size=config.image_size,
        seed=config.seed, start_step=start, data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None, crop_area_min=config.crop_area_min))
    preemption = _Preemption()
    self.progress = Progress(start=start, total=total, enabled=config.progress_bar)
    self.throughput.start()
    try:
      for step in range(start + 1, total + 1):  # `step`: updates done once this one is
        try:
          local = next(batches)
        except StopIteration:
          raise ConfigError(f"the training data of {config.dataset!r} ran out at step {step};"
                            " train_batches should repeat forever") from None
        state, metrics = compiled(state, sharding.global_batch(local, self.mesh), rng)
        self.settle()  # the previous step's metrics, while this one runs
        self.pending = (step, metrics)
        if step == start + 1 and device_peak_bytes() is not None:
          self.settle()
          self.progress.print(f"device peak bytes in use after the first step:"
                              f" {_gib(device_peak_bytes())}")
        stop = preemption.reached(step) or step == stop_at_step or step == total
        save = stop or step % config.checkpoint_every == 0
        log_now = stop or step % config.log_every == 0
        eval_now = step == total or step % config.eval_every == 0
        if save or log_now or eval_now:
          self.settle()
        if log_now:
          result.update(self.log_train(step))
        if save:
          self.ckpts.save(step, state)
          self.last_saved = step
        if eval_now:
          result.update(self.evaluate(step, state.variables))
        result["step"] = step
        if stop:
          result["preempted"] = step != total
          break
    finally:
      preemption.restore()
      self.progress.close()
    return result
