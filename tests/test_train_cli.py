"""experiments/finetune.py (razor_jax.train.cli): named configs, overrides, errors, the demo."""
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from razor_jax import Policy
from razor_jax.train import cli
from razor_jax.train import config as train_config
from razor_jax.train import setup as train_setup
from razor_jax.train import step as train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")
EXPECTED_CONFIGS = ["cnn_demo", "demo", "demo_all", "mbv2_flowers", "proxyless_cub",
                    "proxyless_flowers", "vit_b16_cars", "vit_b16_cifar10", "vit_b16_cifar100",
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


def test_paper_configs_train_what_the_paper_trained():
  """The ViT-L/16 configs, read by the trainer's own code: the model, optimizer, schedule
  and Back Razor policy of the paper's Table 1 runs."""
  # vit_l16_cub: the paper's 0.9 with log4 values; vit_l16_flowers: 0.8, the default policy.
  for name, lr, steps, policy in (("vit_l16_cub", 0.01, 6000, Policy(0.9, value_format="log4")),
                                  ("vit_l16_flowers", 0.03, 2000, Policy())):
    config = train_config.complete(cli.load_config(name, CONFIGS))
    train_setup.check_config(config, num_devices=8)
    model = train_setup.build_model(config, num_classes=200)
    assert model.sizes == (16, 1024, 4096, 16, 24)  # ViT-L/16
    assert model.razor_policy == policy and model.razor_policy.gelu == "uint2"
    tx, schedule = train_step.make_optimizer(config)
    # Linear warm-up over 500 steps to the peak, cosine decay to 0 at the last step.
    np.testing.assert_allclose([schedule(0), schedule(250), schedule(500), schedule(steps)],
                               [0.0, lr / 2, lr, 0.0], atol=1e-9)
    assert config.batch_size == 128 and config.init_path.endswith("imagenet21k/ViT-L_16.npz")
    # SGD with momentum 0.9 after clipping the gradient norm to 1: the momentum trace of
    # two equal steps adds up to 1.9 steps.
    params = {"w": np.zeros(3, np.float32)}
    state = tx.init(params)
    grad = {"w": np.array([3.0, 4.0, 0.0], np.float32)}  # norm 5: clipped to unit norm
    for _ in range(2):
      updates, state = tx.update(grad, state, params)
    np.testing.assert_allclose(updates["w"] / -schedule(1), [0.6 * 1.9, 0.8 * 1.9, 0.0],
                               rtol=1e-5)


def test_schedule_is_the_one_the_trainer_always_had():
  """optax's warmup_cosine_decay_schedule gives the hand-written schedule's numbers, bit for
  bit, short runs included."""
  def hand_written(config):  # the trainer's schedule before it used optax's
    warmup = min(config.warmup_steps, config.total_steps)
    cosine = optax.cosine_decay_schedule(config.lr, max(config.total_steps - warmup, 1))
    if warmup == 0:
      return cosine
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), cosine],
                                [warmup])
  for warmup, total in ((500, 6000), (50, 500), (0, 10), (10, 10), (20, 10), (1, 2)):
    config = train_config.complete(dict(lr=0.1, warmup_steps=warmup, total_steps=total))
    steps = np.arange(total + 1)
    np.testing.assert_array_equal(jax.vmap(train_step.make_schedule(config))(steps),
                                  jax.vmap(hand_written(config))(steps))


def test_overrides_parse_as_the_field_type():
  config, workdir = cli.parse(
      ["--config", "vit_b16_cub", "--config.optimizer.name=adam", "--config.lr", "3e-4",
       "--config.total_steps=10", "--config.model.scan=false", "--config.policy.attention=0",
       "--config.init_path=", "--workdir=runs/x"], CONFIGS)
  assert workdir == "runs/x"
  assert config.optimizer.name == "adam" and config.lr == 3e-4 and config.total_steps == 10
  assert config.model.scan is False and config.policy.attention == 0.0
  assert config.init_path == ""
  with pytest.raises(AttributeError):  # locked: an update cannot add a key
    config.optimiser = 1
  # A path works as well as a name; the workdir defaults to workdir/NAME.
  config, workdir = cli.parse(["--config", os.path.join(CONFIGS, "demo.py")], CONFIGS)
  assert workdir == os.path.join("workdir", "demo") and config.dataset == "digits_demo"


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
  assert "Traceback" not in err


def test_bad_value_names_the_expected_type(capsys):
  code, _, err = _main(capsys, "--config", "demo", "--config.total_steps=many")
  assert code == 2 and "--config.total_steps='many': expected int" in err
  code, _, err = _main(capsys, "--config", "demo", "--config.optimizer=adam")
  assert code == 2 and "'optimizer' is a group; set one of its fields" in err
  code, _, err = _main(capsys, "--config", "demo", "stray")
  assert code == 2 and "unexpected argument 'stray'" in err


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


@pytest.mark.slow
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


@pytest.mark.slow
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
