"""The trainer on CNNs: config.model.name, BatchNorm state in the TrainState, the CNN configs.

tests/conftest.py gives 8 CPU devices. The runs here use the tiny CNN at 16 px and share
one config where they can, so its compiled step is reused (setup.compile_step caches it).
"""
import copy
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from razor_jax import Policy, train
from razor_jax.models import mobilenet, mobilenet_checkpoint
from razor_jax.train import checkpoint, cli, sharding
from razor_jax.train import config as train_config
from razor_jax.train import setup as train_setup
from razor_jax.train import step as train_step
from razor_jax.train import workdir as train_workdir
from synthetic_data import SyntheticData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")
ASSET = os.path.join(REPO, "experiments", "assets", "cnn_demo_digits.npz")

# The tiny CNN with BatchNorm in train mode on 4 synthetic classes, from scratch.
TINY_CNN = dict(
    dataset="synthetic", image_size=16, batch_size=8, total_steps=8, warmup_steps=2, lr=3e-3,
    model=dict(name="tiny_cnn", batch_norm="train"), optimizer=dict(name="adam"),
    init_path="", prune_ratio=0.9, log_every=2, eval_every=8, checkpoint_every=4,
    memory_report=False, progress_bar=False, async_checkpointing=False,
    mesh=dict(data=1, fsdp=1))


def tiny_cnn(**overrides):
  """TINY_CNN with some fields changed (nested dicts are merged)."""
  config = copy.deepcopy(TINY_CNN)
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key] = {**config.get(key, {}), **value}
    else:
      config[key] = value
  return train_config.complete(config)


def _two_steps(config):
  """(state before, state after) two train steps of `config` from scratch, by the trainer's
  compiled step (cached: the runs of the same config below reuse it)."""
  mesh = sharding.make_mesh(1, 1)
  model = train_setup.build_model(config, 4)
  tx, abstract, compiled = train_setup.compile_step(model, config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  state = train_setup.init_state(model, tx, config, mesh, shardings, jax.random.key(0))
  before = jax.device_get(state)
  rng = sharding.replicated_key(jax.random.key(1), mesh)
  batches = SyntheticData().train_batches("synthetic", batch_size=8, image_size=16, seed=0)
  for _ in range(2):  # the first update has learning rate 0 (the warm-up starts there)
    state, metrics = compiled(state, sharding.global_batch(next(batches), mesh), rng)
    assert np.isfinite(float(metrics["loss"]))
  return before, jax.device_get(state)


def _changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------- BatchNorm state


@pytest.mark.slow  # compiles the tiny CNN's train step (tens of seconds on 2 cores)
@pytest.mark.parametrize("batch_norm", ["train", "frozen"])
def test_batch_stats_update_in_train_mode_only(batch_norm):
  before, after = _two_steps(tiny_cnn(model=dict(batch_norm=batch_norm)))
  assert set(before.batch_stats) >= {"bn_Conv1", "Conv_1_bn"}
  assert before.variables.keys() == {"params", "batch_stats"}
  moved = _changed(before.batch_stats, after.batch_stats)
  assert moved == (batch_norm == "train"), (batch_norm, moved)
  assert _changed(before.params, after.params)  # the params train in both modes
  if batch_norm == "train":
    # The running mean moves 10% of the way to the batch mean (momentum 0.9) from 0.
    assert np.all(np.isfinite(after.batch_stats["bn_Conv1"]["mean"]))
    assert np.any(after.batch_stats["bn_Conv1"]["mean"] != 0)


def test_vit_state_has_no_batch_stats():
  config = train_config.complete(dict(model=dict(variant="", patch_size=4, hidden_size=32,
                                                 mlp_dim=64, num_heads=2, num_layers=1),
                                      image_size=8, init_path=""))
  model = train_setup.build_model(config, 4)
  tx, _ = train_step.make_optimizer(config)
  abstract = train_setup.abstract_state(model, tx, config)
  assert abstract.batch_stats == {} and abstract.variables.keys() == {"params"}
  cnn = tiny_cnn()
  abstract = train_setup.abstract_state(train_setup.build_model(cnn, 4),
                                        train_step.make_optimizer(cnn)[0], cnn)
  assert abstract.batch_stats["bn_Conv1"]["var"].shape == (16,)


def test_frozen_params_get_no_update_even_with_weight_decay():
  """TinyTL-B under AdamW: only biases and the classifier move; frozen params keep no state."""
  config = tiny_cnn(model=dict(finetune="biases", batch_norm=None), prune_ratio=0.0,
                    optimizer=dict(name="adamw", weight_decay=0.1), warmup_steps=0)
  model = train_setup.build_model(config, 4)
  params = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
  tx = train_setup.mask_frozen(train_step.make_optimizer(config)[0], model)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(updates["Conv1"]["kernel"] == 0) and np.all(updates["bn_Conv1"]["scale"] == 0)
  assert np.all(updates["bn_Conv1"]["bias"] != 0) and np.all(updates["predictions"]["kernel"] != 0)
  # BatchNorm fixed under full fine-tuning: the convs train, BatchNorm does not.
  fixed = train_setup.build_model(tiny_cnn(model=dict(batch_norm="fixed")), 4)
  mask = fixed.trainable(params)
  assert mask["Conv1"]["kernel"] and not mask["bn_Conv1"]["scale"] and not mask["bn_Conv1"]["bias"]


@pytest.mark.slow  # three short runs sharing one compiled step
def test_resumed_run_equals_uninterrupted_batch_stats_included(tmp_path):
  whole = train.run(tiny_cnn(), str(tmp_path / "whole"), datasets=SyntheticData())
  assert whole["step"] == 8
  first = train.run(tiny_cnn(), str(tmp_path / "split"), datasets=SyntheticData(),
                    stop_at_step=4)
  assert first["preempted"] and checkpoint.intact_steps(str(tmp_path / "split")) == [4]
  # The checkpoint of step 4 holds the running averages the train step left.
  at4 = checkpoint.load_variables(str(tmp_path / "split"), 4)
  assert at4.keys() == {"params", "batch_stats"}
  assert np.any(at4["batch_stats"]["bn_Conv1"]["mean"] != 0)
  second = train.run(tiny_cnn(), str(tmp_path / "split"), datasets=SyntheticData())
  assert second["step"] == 8 and not second["preempted"]
  chex.assert_trees_all_equal(checkpoint.load_variables(str(tmp_path / "split")),
                              checkpoint.load_variables(str(tmp_path / "whole")))
  assert second["eval/loss"] == whole["eval/loss"]


def test_checkpoint_round_trip_restores_batch_stats(tmp_path):
  state = train_step.TrainState(
      step=jnp.array(3, jnp.int32), params={"w": jnp.arange(4.0)}, opt_state=(),
      batch_stats={"bn": {"mean": jnp.array([0.5, -1.0]), "var": jnp.array([2.0, 3.0])}})
  ckpts = checkpoint.Checkpoints(str(tmp_path), async_save=False)
  ckpts.save(3, state)
  ckpts.wait()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          state)
  step, restored = ckpts.restore_latest(abstract)
  ckpts.close()
  assert step == 3 and isinstance(restored, train_step.TrainState)
  chex.assert_trees_all_equal(restored, state)
  assert checkpoint.load_variables(str(tmp_path))["batch_stats"]["bn"]["var"].tolist() == [2, 3]


def test_vit_checkpoints_keep_the_layout_from_before_batch_stats(tmp_path):
  """A ViT's TrainState is written as before the field existed, and such a checkpoint
  (written here as the old code did) restores into today's TrainState."""
  old = {"step": jnp.array(5, jnp.int32), "params": {"w": jnp.ones(3)}, "opt_state": ()}
  manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(5, args=ocp.args.StandardSave(old))
  manager.wait_until_finished()
  manager.close()
  new = train_step.TrainState(step=old["step"], params=old["params"], opt_state=())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), new)
  ckpts = checkpoint.Checkpoints(str(tmp_path), async_save=False)
  step, restored = ckpts.restore_latest(abstract)
  assert step == 5 and restored.batch_stats == {}
  chex.assert_trees_all_equal(restored, new)
  ckpts.save(6, new)  # and today's ViT checkpoint has the same tree as the old one
  ckpts.close()
  metadata = json.load(open(tmp_path / "checkpoints" / "6" / "default" / "_METADATA"))
  assert not any("batch_stats" in key for key in metadata["tree_metadata"])


def test_workdir_of_a_run_before_model_name_resumes(tmp_path):
  """config.json of an older run lacks model.name and the CNN fields: no change at defaults."""
  config = train_config.complete(dict(init_path=""))
  old = json.loads(config.to_json())
  for key in ("name",) + train_config.CNN_FIELDS:
    del old["model"][key]
  del old["policy"]["conv"]
  (tmp_path / train_workdir.CONFIG_FILE).write_text(json.dumps(old))
  assert train_workdir.check_config_unchanged(config, str(tmp_path)) == {}
  with pytest.raises(train.ConfigChangedError, match=r"model.name \(None -> 'tiny_cnn'\)"):
    train_workdir.check_config_unchanged(tiny_cnn(), str(tmp_path))


# ----------------------------------------------------------------- configs and models


@pytest.mark.parametrize("name, arch, classes", [
    ("proxyless_flowers", "proxyless_mobile", 102), ("proxyless_cub", "proxyless_mobile", 200),
    ("mbv2_flowers", "mobilenet_v2", 102), ("cnn_demo", "tiny", 5)])
def test_cnn_configs_build_their_model(name, arch, classes):
  config = train_config.complete(cli.load_config(name, CONFIGS))
  train_setup.check_config(config, num_devices=8)
  model = train_setup.build_model(config, classes)
  assert isinstance(model, mobilenet.CNN) and model.arch == arch
  assert model.num_classes == classes and model.batch_norm == "fixed"
  # The paper's CNN runs: conv and head at 0.9; a CNN's "auto" values are log4 on every op.
  assert model.razor_policy == Policy(0.9, value_format="log4")
  assert model.razor_policy.spec("conv").prune_ratio == 0.9
  assert {model.razor_policy.spec(t).value_format for t in ("conv", "dense", "layer_norm")} == {
      "log4"}
  # Evaluation and the memory report: the same params, plain autodiff.
  dense = train_setup.build_model(config, classes, full_finetuning=True)
  assert dense.arch == arch and not dense.razor_policy.prunes
  if name != "cnn_demo":  # the paper's recipe (cmds/CNN/*.sh of the original code)
    assert (config.batch_size, config.lr, config.optimizer.name) == (8, 1e-4, "adam")
    assert config.label_smoothing == 0.7 and model.dropout_rate == 0.2
    assert config.crop_area_min == 0.22  # tinytl_fgvc_train.py's resize_scale
  if arch == "mobilenet_v2":
    assert model.width == 1.0 and config.init_path.endswith("_1.0_224.h5")
    v = jax.eval_shape(lambda: train_setup.build_model(config, 1000).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert mobilenet.param_count(v["params"]) == 3_504_872  # the public MobileNetV2


def test_policy_knob_applies_to_cnns():
  assert train_setup.build_model(tiny_cnn(prune_ratio=0.8), 4).razor_policy == Policy(
      0.8, value_format="log4")
  # An explicit value format is the CNN's too (only "auto" means log4 there).
  signed = train_setup.build_model(tiny_cnn(policy=dict(value_format="sign")), 4)
  assert signed.razor_policy.spec("dense").value_format == "sign"
  model = train_setup.build_model(tiny_cnn(policy=dict(conv=0.0)), 4)
  assert model.razor_policy.spec("conv") is None and model.razor_policy.ratio("dense") == 0.9
  paper = train_setup.build_model(tiny_cnn(policy=dict(preset="paper")), 4)
  assert paper.razor_policy == Policy.paper(0.9)
  assert not train_setup.build_model(tiny_cnn(prune_ratio=0.0), 4).razor_policy.prunes
  actnn = train_setup.build_model(tiny_cnn(prune_ratio=0.0, model=dict(compression="actnn")), 4)
  assert actnn.compression == "actnn" and actnn.policy is None


def test_pretrained_npz_loads_with_a_new_head():
  config = train_config.complete(cli.load_config("cnn_demo", CONFIGS))
  model = train_setup.build_model(config, 5)
  v = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  params, stats = train_setup._load_pretrained(config, v["params"], v["batch_stats"])  # pylint: disable=protected-access
  asset = mobilenet_checkpoint.read_npz(ASSET)
  np.testing.assert_array_equal(params["Conv1"]["kernel"], asset[("params", "Conv1", "kernel")])
  np.testing.assert_array_equal(stats["bn_Conv1"]["var"], asset[("batch_stats", "bn_Conv1", "var")])
  # keep_head=False (the default): the model's own, freshly initialized classifier.
  np.testing.assert_array_equal(params["predictions"]["kernel"], v["params"]["predictions"]["kernel"])
  assert not np.array_equal(params["predictions"]["kernel"],
                            asset[("params", "predictions", "kernel")])
  config.keep_head = True  # same 5 classes: the file's classifier fits and is taken
  params, _ = train_setup._load_pretrained(config, v["params"], v["batch_stats"])  # pylint: disable=protected-access
  np.testing.assert_array_equal(params["predictions"]["kernel"],
                                asset[("params", "predictions", "kernel")])


def test_save_npz_round_trips(tmp_path):
  model = mobilenet.CNN(arch="tiny", num_classes=3)
  v = jax.device_get(model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3))))
  path = str(tmp_path / "tiny.npz")
  mobilenet_checkpoint.save_npz(path, v["params"], v["batch_stats"])
  zeros = jax.tree.map(np.zeros_like, v)
  params, stats = mobilenet_checkpoint.load_npz(path, zeros["params"], zeros["batch_stats"])
  chex.assert_trees_all_equal({"params": params, "batch_stats": stats}, v)


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, message", [
    (dict(model=dict(name="mobilenet")),
     r"unknown model.name 'mobilenet' \(did you mean 'mobilenet_v2'\?\); expected one of"
     r" 'vit'.*'proxyless_mobile'.*'tiny_cnn'"),
    (dict(model=dict(patch_size=4)),
     r"model.patch_size=4 only apply to the ViT, but model.name='tiny_cnn'"),
    (dict(model=dict(scan=False)), r"model.scan=False only apply to the ViT"),
    (dict(policy=dict(attention=0.0)), r"policy.attention=0.0 only apply to the ViT"),
    (dict(policy=dict(softmax=0.5)), r"policy.softmax=0.5 only apply to the ViT"),
    (dict(model=dict(width=0.5)), r"model.width=0.5 is MobileNetV2's width multiplier"),
    (dict(model=dict(batch_norm="eval")),
     r"model.batch_norm must be one of \('train', 'frozen', 'fixed'\) \(or unset\), got 'eval'"),
    (dict(model=dict(compression="actnn")),
     r"compression='actnn' keeps activations in 2 bits instead of pruning them; pass"
     r" --config.prune_ratio=0"),
    (dict(model=dict(finetune="biases")), r"finetune='biases' \(TinyTL\) freezes the weights"),
    (dict(policy=dict(preset="fast")), r"config.policy.preset must be one of"),
])
def test_bad_cnn_config_values_are_clear_errors(overrides, message):
  with pytest.raises(train.ConfigError, match=message):
    train_setup.check_config(tiny_cnn(**overrides), num_devices=1)


def test_cnn_fields_with_the_vit_are_clear_errors():
  vit = dict(model=dict(name="vit", variant="", patch_size=4, hidden_size=32, mlp_dim=64,
                        num_heads=2, num_layers=1), image_size=8, init_path="")
  train_setup.check_config(train_config.complete(vit), num_devices=1)  # fine as it is
  for field, value in (("batch_norm", "train"), ("width", 1.0)):
    config = train_config.complete({**vit, "model": {**vit["model"], field: value}})
    with pytest.raises(train.ConfigError, match=rf"model.{field}=.* only apply to CNNs, but"
                       r" model.name='vit'; set --config.model.name to one of mobilenet_v2"):
      train_setup.check_config(config, num_devices=1)
  config = train_config.complete({**vit, "policy": {"conv": 0.5}})
  with pytest.raises(train.ConfigError, match="policy.conv=0.5 only apply to CNNs"):
    train_setup.check_config(config, num_devices=1)


def test_cnn_init_path_errors(tmp_path, capsys):
  # The paper configs' default files are not here: one line that says what to get.
  code = cli.main(["--config", "proxyless_flowers", "--workdir", str(tmp_path / "a")], CONFIGS)
  err = capsys.readouterr().err
  assert code == 1 and "Traceback" not in err
  assert "pretrained weights not found: init_path='proxyless_mobile_imagenet.npz'" in err
  assert "save_npz" in err and "--config.init_path=''" in err
  code = cli.main(["--config", "mbv2_flowers", "--workdir", str(tmp_path / "b")], CONFIGS)
  err = capsys.readouterr().err
  assert code == 1 and "keras-applications/mobilenet_v2/" in err
  with pytest.raises(train.CheckpointMissingError, match="read from a local file"):
    train_setup.check_init_path("gs://bucket/mobilenet_v2.h5", "mobilenet_v2")
  fake = tmp_path / "weights.h5"
  fake.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
  with pytest.raises(train.CheckpointUnreadableError, match="for MobileNetV2 only"):
    train_setup.check_init_path(str(fake), "proxyless_mobile")
  text = tmp_path / "weights.npz"
  text.write_text("not an archive")
  with pytest.raises(train.CheckpointUnreadableError, match=r"is a text file.*save_npz"):
    train_setup.check_init_path(str(text), "tiny_cnn")
  # A file of another architecture (the ViT demo's) fails before training, naming it.
  config = tiny_cnn(init_path=os.path.join(REPO, "experiments", "assets", "vit_demo_digits.npz"))
  model = train_setup.build_model(config, 4)
  v = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  with pytest.raises(mobilenet_checkpoint.CheckpointMismatchError, match="not a CNN .npz"):
    train_setup._load_pretrained(config, v["params"], v["batch_stats"])  # pylint: disable=protected-access


# ----------------------------------------------------------------- the demo


@pytest.mark.slow
def test_cnn_demo_fine_tunes_the_pretrained_cnn_end_to_end(capsys, tmp_path):
  """The cnn_demo config through the CLI on digits_demo, from the pretrained asset."""
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("sklearn")
  workdir = tmp_path / "run"
  code = cli.main(
      ["--config", "cnn_demo", f"--config.data_dir={tmp_path / 'tfds'}",
       "--workdir", str(workdir),
       # Shorter than the demo so the test takes seconds; one device, no second compile.
       "--config.total_steps=60", "--config.warmup_steps=5", "--config.log_every=10",
       "--config.eval_every=1000", "--config.checkpoint_every=1000", "--config.mesh.data=1",
       "--config.eval_batch_size=200", "--config.progress_bar=false",
       "--config.memory_report=false"], CONFIGS)
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "starting from " + os.path.normpath(ASSET) in out
  accuracy = float(out.split("eval accuracy ")[-1].split(";")[0])
  assert accuracy > 0.6, out  # 5 classes: chance is 0.2 (the full demo reaches ~0.97)
  losses = [row["train/loss"] for row in map(json.loads, open(workdir / "metrics.jsonl"))
            if "train/loss" in row]
  assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses  # about 0.5x
  # BatchNorm fixed: the running averages are the pretrained ones, untouched.
  saved = checkpoint.load_variables(str(workdir))
  asset = mobilenet_checkpoint.read_npz(ASSET)
  np.testing.assert_array_equal(saved["batch_stats"]["block_3_expand_BN"]["mean"],
                                asset[("batch_stats", "block_3_expand_BN", "mean")])
