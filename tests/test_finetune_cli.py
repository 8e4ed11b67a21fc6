"""experiments/finetune.py: named configs, overrides, clean errors, and the demo end to end."""
import os
import subprocess
import sys

import pytest

from razor_jax import cli, train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")
EXPECTED_CONFIGS = ["demo", "vit_b16_cars", "vit_b16_cifar10", "vit_b16_cifar100",
                    "vit_b16_cub", "vit_b16_flowers", "vit_b16_food101", "vit_b16_pets",
                    "vit_l16_cub", "vit_l16_flowers"]


def _main(capsys, *argv):
  code = cli.main(list(argv), CONFIGS)
  out, err = capsys.readouterr()
  return code, out, err


def test_every_named_config_loads_with_valid_fields():
  assert cli.config_names(CONFIGS) == EXPECTED_CONFIGS
  for name in EXPECTED_CONFIGS:
    config = cli.load_config(name, CONFIGS)
    train_config.complete(config)  # no field the trainer does not know
    with open(os.path.join(CONFIGS, f"{name}.py")) as f:
      assert f"--config {name}" in f.read(), f"{name}.py should state its command"


def test_paper_defaults():
  cub, flowers = (cli.load_config(n, CONFIGS) for n in ("vit_l16_cub", "vit_l16_flowers"))
  for config in (cub, flowers):
    assert (config.batch_size, config.optimizer.name, config.optimizer.momentum) == (128, "sgd", 0.9)
    assert (config.warmup_steps, config.grad_clip_norm, config.model.variant) == (500, 1.0, "L/16")
    assert config.init_path.endswith("imagenet21k/ViT-L_16.npz")
  assert (cub.lr, cub.total_steps, cub.prune_ratio) == (0.01, 6000, 0.9)
  assert (flowers.lr, flowers.total_steps, flowers.prune_ratio) == (0.03, 2000, 0.8)


def test_overrides_parse_as_the_field_type():
  config = cli.load_config("vit_b16_cub", CONFIGS)
  name, overrides, workdir = cli.parse_args(
      ["--config", "vit_b16_cub", "--config.optimizer.name=adam", "--config.lr", "3e-4",
       "--config.total_steps=10", "--config.model.scan=false", "--config.policy.attention=0",
       "--config.init_path=", "--workdir=runs/x"])
  assert (name, workdir) == ("vit_b16_cub", "runs/x")
  for dotted, raw in overrides:
    cli.apply_override(config, dotted, raw)
  assert config.optimizer.name == "adam" and config.lr == 3e-4 and config.total_steps == 10
  assert config.model.scan is False and config.policy.attention == 0.0
  assert config.init_path == ""


def test_unknown_config_lists_the_valid_ones(capsys):
  code, _, err = _main(capsys, "--config", "vit_l16_cubb")
  assert code == 2
  assert "unknown config 'vit_l16_cubb'" in err and "did you mean 'vit_l16_cub'" in err
  assert "vit_b16_cifar100" in err and "Traceback" not in err


def test_misspelled_key_lists_the_valid_ones(capsys):
  code, _, err = _main(capsys, "--config", "demo", "--config.optimizer.nane=adam")
  assert code == 2
  assert "unknown config key 'optimizer.nane'" in err and "did you mean 'name'" in err
  assert "momentum" in err  # the valid keys of config.optimizer


def test_bad_value_names_the_expected_type(capsys):
  code, _, err = _main(capsys, "--config", "demo", "--config.total_steps=many")
  assert code == 2 and "expected int" in err


def test_help(capsys):
  code, out, _ = _main(capsys, "--help")
  assert code == 0 and "--config NAME" in out and "vit_l16_cub" in out


def test_missing_checkpoint_is_a_clean_error(capsys, tmp_path):
  code, _, err = _main(capsys, "--config", "demo", "--config.init_path=nowhere/ViT.npz",
                       "--workdir", str(tmp_path))
  assert code == 1
  assert "pretrained checkpoint not found: init_path='nowhere/ViT.npz'" in err
  assert "--config.init_path=''" in err


def test_batch_not_divisible_by_devices_is_a_clean_error(capsys, tmp_path):
  code, _, err = _main(capsys, "--config", "demo", "--config.batch_size=12",
                       "--workdir", str(tmp_path))
  assert code == 1
  assert "must be divisible by the number of devices (8)" in err
  assert "--config.batch_size=16" in err


def test_missing_dataset_is_a_clean_error(capsys, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  code, _, err = _main(capsys, "--config", "vit_b16_cars", "--config.init_path=",
                       f"--config.data_dir={tmp_path / 'tfds'}", "--workdir", str(tmp_path))
  assert code == 1
  assert "cars196" in err and "Traceback" not in err


def test_errors_exit_without_a_traceback(tmp_path):
  # The real entry point in a fresh process: one message, a non-zero status.
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "finetune.py"), "--config", "demo",
       "--config.batch_size=12", "--workdir", str(tmp_path)],
      capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert "error: batch_size must be divisible by the number of devices" in proc.stderr


def test_demo_fine_tunes_a_tiny_vit_end_to_end(capsys, tmp_path):
  """The demo config through the CLI on digits_demo, built on disk as TFRecords."""
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("sklearn")
  code, out, err = _main(
      capsys, "--config", "demo", f"--config.data_dir={tmp_path / 'tfds'}",
      "--config.init_path=", "--workdir", str(tmp_path / "run"),
      # Smaller than the demo so the test takes seconds: from scratch, 200 steps.
      "--config.model.patch_size=8", "--config.model.hidden_size=32",
      "--config.model.mlp_dim=64", "--config.model.num_layers=2", "--config.model.num_heads=2",
      "--config.batch_size=32", "--config.eval_batch_size=200", "--config.mesh.data=1",
      "--config.total_steps=200", "--config.warmup_steps=10", "--config.lr=0.05",
      "--config.eval_every=1000", "--config.checkpoint_every=1000", "--config.progress_bar=false",
      "--config.memory_report=false")
  assert code == 0, err
  assert list((tmp_path / "tfds" / "digits_demo" / "finetune").glob("*/*.tfrecord*"))
  accuracy = float(out.split("eval accuracy ")[-1].split(";")[0])
  assert accuracy > 0.4, out  # 5 classes: chance is 0.2
