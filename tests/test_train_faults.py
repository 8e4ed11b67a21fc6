"""Faults and bad inputs a new user meets: damaged checkpoints, a changed config, bad files.

Every bad input must end before anything compiles, in one line, with the workdir as it
was; every damaged checkpoint must be moved aside and the run resumed from the newest
intact step. One tiny run stopped at step 8 (module fixture) is copied for each case.
"""
import errno
import json
import os
import shutil
import tempfile
import time

import pytest

from razor_jax import train
from razor_jax.data import tfds_source
from razor_jax.train import checkpoint, cli
from razor_jax.train import loop as train_loop
from synthetic_data import SyntheticData

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "configs")
TINY = dict(
    dataset="synthetic", image_size=8, batch_size=8, total_steps=12, warmup_steps=2, lr=0.1,
    model=dict(variant="", patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1),
    init_path="", prune_ratio=0.9, log_every=4, eval_every=8, checkpoint_every=4,
    memory_report=False, progress_bar=False, async_checkpointing=False,
    mesh=dict(data=1, fsdp=1))


def _tiny(**changes):
  return {**TINY, **changes}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A workdir whose run of 12 steps stopped at step 8, with checkpoints of steps 4 and 8.

  Every run below keeps the fields the train step depends on, so all reuse its compile.
  """
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  result = train.run(TINY, str(workdir), datasets=SyntheticData(), stop_at_step=8)
  assert result["step"] == 8 and checkpoint.intact_steps(str(workdir)) == [4, 8]
  return str(workdir), result


def _copy(stopped, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped[0], workdir)
  return workdir


def _snapshot(workdir):
  """Every file under workdir with its size and mtime: equal snapshots = untouched."""
  return {os.path.relpath(os.path.join(root, f), workdir):
          (os.path.getsize(os.path.join(root, f)), os.path.getmtime(os.path.join(root, f)))
          for root, _, files in os.walk(workdir) for f in files}


def _no_compile(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("compiled a train step")
  monkeypatch.setattr(train_loop, "compile_step", refuse)


def _damage(step_dir, kind):
  if kind == "truncated_data_file":
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names
             if os.sep + "d" + os.sep in os.path.join(root, f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  else:
    open(os.path.join(step_dir, "default", "_METADATA"), "w").close()


@pytest.mark.slow  # the module's one training run
@pytest.mark.parametrize("kind", ["truncated_data_file", "emptied_metadata"])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(stopped, tmp_path, kind,
                                                                      capfd):
  workdir = _copy(stopped, tmp_path)
  _damage(os.path.join(workdir, "checkpoints", "8"), kind)
  capfd.readouterr()
  # eval_every may change under a checkpoint (and the change is recorded).
  result = train.run(_tiny(eval_every=6), workdir, datasets=SyntheticData())
  out, err = capfd.readouterr()
  damaged = [line for line in (out + err).splitlines() if "is damaged" in line]
  assert len(damaged) == 1 and "checkpoint of step 8 is damaged" in damaged[0], out + err
  assert "Traceback" not in out + err and len((out + err).splitlines()) < 15, out + err
  assert "resuming from the checkpoint of step 4" in out
  assert result["step"] == 12 and checkpoint.intact_steps(workdir)[-1] == 12
  aside = os.listdir(os.path.join(workdir, "damaged_checkpoints"))
  assert len(aside) == 1 and aside[0].startswith("8-"), aside  # moved, not deleted
  changes = [json.loads(line) for line in open(os.path.join(workdir, "config_changes.jsonl"))]
  assert changes[-1]["changes"] == {"eval_every": {"old": 8, "new": 6}}
  assert changes[-1]["resumed_at_step"] == 4
  assert json.load(open(os.path.join(workdir, "config.json")))["eval_every"] == 6


@pytest.mark.slow
def test_finished_run_says_so_before_compiling(stopped, tmp_path, monkeypatch, capsys):
  workdir = _copy(stopped, tmp_path)
  _no_compile(monkeypatch)
  start = time.perf_counter()
  # total_steps may change: down to the step reached, the run is finished.
  result = train.run(_tiny(total_steps=8), workdir, datasets=SyntheticData())
  assert time.perf_counter() - start < 5
  out = capsys.readouterr().out
  assert f"already at step 8/8: eval accuracy {stopped[1]['eval/accuracy']:.4f}" in out, out
  assert result["step"] == 8 and result["eval/accuracy"] == stopped[1]["eval/accuracy"]


@pytest.mark.slow
def test_changed_config_is_refused_naming_the_fields(stopped, tmp_path, monkeypatch):
  workdir = _copy(stopped, tmp_path)
  before = _snapshot(workdir)
  _no_compile(monkeypatch)
  changed = _tiny(model={**TINY["model"], "num_layers": 2}, init_path="other.npz",
                  log_every=2)
  with pytest.raises(train.ConfigChangedError) as error:
    train.run(changed, workdir, datasets=SyntheticData())
  message = str(error.value)
  assert "model.num_layers (1 -> 2)" in message and "init_path ('' -> 'other.npz')" in message
  assert "log_every" not in message.split("may change")[0]  # mutable: not refused
  assert "--workdir" in message and len(message.splitlines()) == 1
  assert _snapshot(workdir) == before


def _cli(argv, workdir, capsys):
  start = time.perf_counter()
  status = cli.main(["--config", "demo", "--workdir", workdir] + argv, CONFIGS_DIR)
  elapsed = time.perf_counter() - start
  err = capsys.readouterr().err
  return status, err, elapsed


def _truncated_npz(path):
  demo = os.path.join(os.path.dirname(CONFIGS_DIR), "assets", "vit_demo_digits.npz")
  with open(demo, "rb") as f:
    path.write_bytes(f.read()[:5000])
  return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("truncated", "is a truncated or damaged .npz"),
    ("text", "is a text file"),
    ("missing", "pretrained checkpoint not found"),
])
def test_bad_init_path_fails_before_compiling(tmp_path, capsys, monkeypatch, kind, expected):
  _no_compile(monkeypatch)
  path = {"truncated": lambda: _truncated_npz(tmp_path / "cut.npz"),
          "text": lambda: (tmp_path / "notes.npz").write_text("not weights\n") and
                  str(tmp_path / "notes.npz"),
          "missing": lambda: str(tmp_path / "absent.npz")}[kind]()
  workdir = str(tmp_path / "run")
  status, err, elapsed = _cli([f"--config.init_path={path}"], workdir, capsys)
  assert status == cli.EXIT_ERROR and elapsed < 5
  assert err.startswith("error: ") and expected in err and "--config.init_path" in err, err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not os.path.exists(workdir)


def test_bad_workdir_fails_before_compiling(tmp_path, capsys, monkeypatch):
  _no_compile(monkeypatch)
  a_file = tmp_path / "file"
  a_file.write_text("x")
  for workdir, expected in ((str(a_file), "is a file"), (str(a_file / "run"), "which is a file")):
    status, err, elapsed = _cli([], workdir, capsys)
    assert status == cli.EXIT_ERROR and elapsed < 5 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "--workdir" in err
  assert a_file.read_text() == "x"

  # A read-only filesystem: the write probe fails (root passes os.access checks there).
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
  status, err, _ = _cli([], str(tmp_path / "ro" / "run"), capsys)
  assert status == cli.EXIT_ERROR and "is not writable" in err and "Read-only file system" in err
  assert not os.path.exists(tmp_path / "ro")


def test_missing_dataset_hint_names_the_finetuning_flag():
  message = tfds_source._missing_message(  # pylint: disable=protected-access
      "cars196", "cars196", "/data", "reason.", {"http://x/cars.tgz": "cars.tgz"}, True, "")
  assert "--config.manual_dir=M" in message and "--manual_dir M" in message
