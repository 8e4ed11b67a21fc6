"""Input pipelines on real data written to disk: the digits_demo TFDS builder and a
folder of PNGs whose pixels encode each example's id, so order and coverage can be read
back from the batches."""
import socket
import time

import numpy as np
import pytest
import tensorflow as tf

from razor_jax import data
from razor_jax.data import __main__ as data_cli
from razor_jax.data import digits_demo, preprocess, tfds_source

# Folder dataset: 3 classes; train has 7 images a class, test 3 + 4 + 3.
CLASSES = ("cardinal", "sparrow", "wren")
TRAIN_PER_CLASS = 7
TEST_PER_CLASS = (3, 4, 3)


def _write_png(path, example_id: int, label: int, height: int, width: int):
  # A flat colour survives any crop and resize: red carries the id, green the label.
  image = np.empty((height, width, 3), np.uint8)
  image[...] = (example_id, 60 * label, 200)
  tf.io.write_file(str(path), tf.io.encode_png(image))


def _ids(batch):
  """Example ids of a batch's rows, read back from the red channel; -1 for padding."""
  red = (batch["image"][:, :, :, 0] + 1.0) * 127.5
  ids = np.round(red.mean(axis=(1, 2))).astype(int)
  real = batch["mask"] > 0
  assert np.allclose(red[real], ids[real, None, None], atol=1e-3)  # still a flat colour
  return np.where(real, ids, -1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """folder:ROOT with train/ and test/ of class folders; returns (name, train ids by
  id -> label, test ids by id -> label)."""
  root = tmp_path_factory.mktemp("folder")
  train, test = {}, {}
  example_id = 1
  for split, per_class, out in (("train", (TRAIN_PER_CLASS,) * 3, train), ("test", TEST_PER_CLASS, test)):
    for label, (name, count) in enumerate(zip(CLASSES, per_class)):
      (root / split / name).mkdir(parents=True)
      for _ in range(count):
        shape = (17 + example_id % 7, 23 - example_id % 5)  # not square, not equal
        _write_png(root / split / name / f"{example_id:03d}.png", example_id, label, *shape)
        out[example_id] = label
        example_id += 1
  (root / "train" / "notes.txt").write_text("not an image, not a class")
  return f"folder:{root}", train, test


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A data_dir where both digits_demo configs get built on first use."""
  return str(tmp_path_factory.mktemp("tfds"))


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


# Names and errors.

def test_table_has_the_standard_datasets():
  expected = {"caltech_birds2011": 200, "oxford_flowers102": 102, "cifar10": 10, "cifar100": 100,
              "oxford_iiit_pet": 37, "food101": 101, "cars196": 196, "digits_demo": 5,
              "digits_demo/pretrain": 5, "digits_demo/finetune": 5, "digits_demo/all": 10}
  for name, classes in expected.items():
    assert data.num_classes(name) == classes
    info = data.DATASETS[name]
    assert info.train_split and info.eval_split and info.train_split != info.eval_split
  assert data.DATASETS["caltech_birds2011"].eval_split == "test"


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as error:
    data.train_batches("cub200", batch_size=8, image_size=32, seed=0)
  message = str(error.value)
  assert "'cub200'" in message and "caltech_birds2011" in message and "digits_demo" in message
  assert "folder:" in message


def test_missing_dataset_fails_fast_with_instructions(tmp_path, monkeypatch):
  def no_download(*args, **kwargs):
    raise AssertionError("a missing dataset must not reach tfds's downloader")
  monkeypatch.setattr(tfds_source.tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  start = time.monotonic()
  with pytest.raises(data.DatasetMissingError) as error:
    data.train_batches("cifar10", batch_size=8, image_size=32, seed=0, data_dir=str(tmp_path),
                       download=False)
  assert time.monotonic() - start < 10
  message = str(error.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f"tfds build cifar10 --data_dir {tmp_path}" in message
  assert "manual_dir" in message and "cifar-10-binary.tar.gz" in message


def test_missing_dataset_offline_says_no_network(tmp_path, monkeypatch):
  # The connection test decides before tfds would start its minutes of retries.
  monkeypatch.setattr(tfds_source, "unreachable_host", lambda urls: "data.caltech.edu:443")
  start = time.monotonic()
  with pytest.raises(data.DatasetMissingError) as error:
    data.eval_batches("caltech_birds2011", batch_size=8, image_size=32, data_dir=str(tmp_path))
  assert time.monotonic() - start < 10
  message = str(error.value)
  assert "no network" in message and "data.caltech.edu" in message
  assert "tfds build caltech_birds2011" in message


def test_connection_test_on_loopback_and_a_hanging_lookup(monkeypatch):
  """No real network: a port listening on loopback, one refusing, a lookup that hangs."""
  monkeypatch.setattr(tfds_source.urllib.request, "getproxies", lambda: {})
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert tfds_source.unreachable_host([f"http://127.0.0.1:{port}/a.tgz"]) is None
  # The server is closed: its port now refuses connections.
  assert tfds_source.unreachable_host([f"http://127.0.0.1:{port}/a.tgz"],
                                      timeout=1.0) == f"127.0.0.1:{port}"

  def hanging_lookup(address, timeout=None):
    time.sleep(30)  # a DNS lookup that socket timeouts do not bound
  monkeypatch.setattr(tfds_source.socket, "create_connection", hanging_lookup)
  start = time.monotonic()
  assert tfds_source.unreachable_host(["https://data.example/x.tgz"],
                                      timeout=0.2) == "data.example:443"
  assert time.monotonic() - start < 3


def test_manual_dataset_lists_the_files_to_fetch(tmp_path):
  with pytest.raises(data.DatasetMissingError) as error:
    data.num_examples("cars196", "train", str(tmp_path))
  message = str(error.value)
  assert "manual_dir" in message and "cars_train.tgz" in message and "tfds build" not in message
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "cars_train.tgz").write_bytes(b"")
  with pytest.raises(data.DatasetMissingError, match="lacks cars_test.tgz"):
    data.num_examples("cars196", "train", str(tmp_path / "data"), manual_dir=str(manual))


def test_missing_folder_explains_layout(tmp_path):
  with pytest.raises(data.DatasetMissingError, match="train/CLASS/IMAGE"):
    data.num_classes(f"folder:{tmp_path / 'nowhere'}")
  (tmp_path / "train" / "a").mkdir(parents=True)
  with pytest.raises(data.DatasetMissingError, match="no eval split"):
    data.num_classes(f"folder:{tmp_path}")


def test_bad_arguments(folder):
  name, _, _ = folder
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    data.train_batches(name, batch_size=6, image_size=8, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="non-negative integer"):
    data.train_batches(name, batch_size=4, image_size=8, seed=-1)
  with pytest.raises(ValueError, match="no split 'valid'"):
    data.eval_batches(name, batch_size=4, image_size=8, split="valid")


# The digits_demo builder.

@pytest.mark.slow
def test_digits_demo_is_built_on_disk_from_scikit_learn(digits_dir):
  from sklearn.datasets import load_digits
  digits = load_digits()
  test_rows = np.array([digits_demo.is_test(i) for i in range(len(digits.target))])
  for config, classes in (("pretrain", range(0, 5)), ("finetune", range(5, 10)),
                          ("all", range(0, 10))):
    name = f"digits_demo/{config}"
    in_config = np.isin(digits.target, list(classes))
    assert data.num_examples(name, "train", digits_dir) == np.sum(in_config & ~test_rows)
    assert data.num_examples(name, "test", digits_dir) == np.sum(in_config & test_rows)
    files = list((tfds_source.epath.Path(digits_dir) / name / "1.0.0").iterdir())
    assert any(".tfrecord" in f.name for f in files) and any(f.name == "dataset_info.json" for f in files)

    # Eval at the stored size gives back exactly the builder's images and labels.
    batches = list(data.eval_batches(name, batch_size=64, image_size=digits_demo.IMAGE_SIZE,
                                     data_dir=digits_dir))
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    images = np.concatenate([b["image"] for b in batches])[mask]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    got = sorted((int(l), np.round((i + 1) * 127.5).astype(np.uint8).tobytes())
                 for i, l in zip(images, labels))
    want = sorted((int(d) - classes.start, digits_demo.to_rgb(image).tobytes())
                  for image, d, t in zip(digits.images, digits.target, test_rows)
                  if t and d in classes)
    assert got == want
  assert data.num_examples("digits_demo", "test", digits_dir) == data.num_examples(
      "digits_demo/finetune", "test", digits_dir)


def test_digits_demo_train_batches(digits_dir):
  batches = data.train_batches("digits_demo", batch_size=16, image_size=24, seed=3, data_dir=digits_dir)
  for batch in _take(batches, 3):
    assert batch["image"].shape == (16, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() < -0.5 and batch["image"].max() == 1.0  # ink on white
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(5))
    assert batch["mask"].dtype == np.float32 and np.all(batch["mask"] == 1.0)


def test_digits_demo_sharded_over_hosts(digits_dir):
  """TFDS even sub-splits: two hosts' eval rows together are the whole test split."""
  def rows(index, count):
    batches = list(data.eval_batches("digits_demo", batch_size=32, image_size=8, data_dir=digits_dir,
                                     process_index=index, process_count=count))
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    assert len(batches) == len(list(data.eval_batches(
        "digits_demo", batch_size=32, image_size=8, data_dir=digits_dir,
        process_index=count - 1, process_count=count)))
    return sorted(image.tobytes() for image in images[mask])

  assert sorted(rows(0, 2) + rows(1, 2)) == rows(0, 1)


# Folder datasets: order, resume, coverage, sharding.

def test_folder_info(folder):
  name, train, test = folder
  assert data.num_classes(name) == 3
  assert data.num_examples(name, "train") == len(train)
  assert data.num_examples(name, "test") == len(test)
  assert data.dataset_info(name).eval_split == "test"


def test_train_order_is_a_function_of_seed_and_step(folder):
  name, train, _ = folder
  kwargs = dict(batch_size=4, image_size=8, seed=7)
  run = _take(data.train_batches(name, **kwargs), 16)
  assert all(b["image"].shape == (4, 8, 8, 3) for b in run)
  for start in (4, 5, 11):  # 21 examples: steps 5 and 10 straddle epochs
    resumed = _take(data.train_batches(name, start_step=start, **kwargs), 16 - start)
    for expected, got in zip(run[start:], resumed):
      for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(expected[key], got[key])
  # TensorFlow's global seed (which tf.data's own shuffle would mix in) changes nothing.
  tf.random.set_seed(1234)
  try:
    again = _take(data.train_batches(name, **kwargs), 16)
  finally:
    tf.random.set_seed(None)
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(run, again))

  # Each epoch is a permutation of the split, reshuffled from epoch to epoch.
  stream = np.concatenate([_ids(b) for b in run])
  labels = np.concatenate([b["label"] for b in run])
  epochs = [stream[i * len(train):(i + 1) * len(train)] for i in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(train)
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert all(train[i] == l for i, l in zip(stream, labels))


def test_seeds_change_order_and_augmentation(folder):
  name, _, _ = folder
  first = _take(data.train_batches(name, batch_size=8, image_size=8, seed=0), 3)
  other = _take(data.train_batches(name, batch_size=8, image_size=8, seed=1), 3)
  assert not np.array_equal(np.concatenate([_ids(b) for b in first]),
                            np.concatenate([_ids(b) for b in other]))


@pytest.mark.slow
def test_augmentation_depends_on_position(digits_dir):
  """Two epochs of one example never share their crops: seeds come from the stream position."""
  batches = _take(data.train_batches("digits_demo", batch_size=256, image_size=32, seed=0,
                                     data_dir=digits_dir, shuffle_buffer=1), 6)
  size = data.num_examples("digits_demo", "train", digits_dir)
  stream = np.concatenate([b["image"] for b in batches])
  # shuffle_buffer=1 keeps file order, so position p and p + size are the same example.
  same_example = [np.array_equal(stream[p], stream[p + size]) for p in range(100)]
  assert sum(same_example) < 10  # crops of half the area or more occasionally coincide


def test_eval_covers_every_example_once_and_masks_padding(folder):
  name, _, test = folder
  batches = data.eval_batches(name, batch_size=4, image_size=8)
  assert len(batches) == 3
  batches = list(batches)
  assert len(batches) == 3 and all(b["image"].shape == (4, 8, 8, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  ids = np.concatenate([_ids(b) for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.dtype == np.float32 and mask.tolist() == [1.0] * len(test) + [0.0] * 2
  assert sorted(ids[mask > 0]) == sorted(test)
  assert all(test[i] == l for i, l in zip(ids[mask > 0], labels[mask > 0]))
  padding = np.concatenate([b["image"] for b in batches])[mask == 0]
  assert np.all(padding == 0.0) and np.all(labels[mask == 0] == 0)


def test_hosts_split_rows_and_examples(folder):
  name, train, test = folder
  count = 3
  seen = []
  lengths = set()
  for index in range(count):
    batches = list(data.eval_batches(name, batch_size=6, image_size=8, process_index=index,
                                     process_count=count))
    lengths.add(len(batches))
    assert all(b["image"].shape[0] == 2 for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    seen += list(np.concatenate([_ids(b) for b in batches])[mask > 0])
  assert lengths == {2}  # 10 examples: 4 + 3 + 3 rows, every host two batches of 2
  assert sorted(seen) == sorted(test)

  first_epochs = []
  for index in range(count):
    batches = _take(data.train_batches(name, batch_size=6, image_size=8, seed=0,
                                       process_index=index, process_count=count), 4)
    assert all(b["image"].shape == (2, 8, 8, 3) for b in batches)
    first_epochs.append(np.concatenate([_ids(b) for b in batches])[:len(train) // count])
  assert sorted(np.concatenate(first_epochs)) == sorted(train)


# Preprocessing details.

def test_decodes_jpeg_and_grey_and_crops_the_centre():
  grey = tf.io.encode_png(np.full((30, 50, 1), 255, np.uint8))
  jpeg = tf.io.encode_jpeg(np.full((40, 20, 3), 0, np.uint8))
  for encoded, value in ((grey, 1.0), (jpeg, -1.0)):
    for fraction in (1.0, 0.875):
      image = preprocess.eval_image(encoded, image_size=16, crop_fraction=fraction).numpy()
      assert image.shape == (16, 16, 3) and np.allclose(image, value, atol=0.02)
  # A centre crop of a left-dark / right-light image sees both halves equally.
  halves = np.zeros((20, 40, 3), np.uint8)
  halves[:, 20:] = 255
  image = preprocess.eval_image(tf.io.encode_png(halves), image_size=10, crop_fraction=0.5).numpy()
  assert np.allclose(image[:, :4], -1.0) and np.allclose(image[:, 6:], 1.0)
  with pytest.raises(ValueError, match="crop_fraction"):
    preprocess.eval_image(grey, image_size=16, crop_fraction=0.0)


def test_prepare_command_line(digits_dir, capsys):
  assert data_cli.main(["digits_demo/pretrain", "--data_dir", digits_dir]) == 0
  assert "train:" in capsys.readouterr().out
  assert data_cli.main(["no_such_set"]) == 1
  assert "Unknown dataset" in capsys.readouterr().err
