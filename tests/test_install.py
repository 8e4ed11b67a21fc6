"""What each install brings: the core imports nothing of the train extra, and a fresh
`pip install .` without extras runs a RazorDense gradient with no TensorFlow around."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What only the `train` (or `bench`) extra installs.
EXTRA_MODULES = ("orbax", "tensorflow", "tensorflow_datasets", "sklearn", "tqdm", "tensorboardX",
                 "ml_collections", "matplotlib")

_GRADIENT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    import razor_jax
    from razor_jax import Policy, RazorDense, razorize
    from razor_jax.models import vit
    vit.ViT(10, variant="Ti/16", policy=Policy.make(0.9, attention=0.0))
    x = jax.random.normal(jax.random.key(0), (4, 64))
    def kernel_grad(layer):
      params = layer.init(jax.random.key(1), x)
      return jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)["params"]["kernel"]
    exact = kernel_grad(RazorDense(8, prune_ratio=0.0))
    pruned = bool(jnp.any(kernel_grad(RazorDense(8)) != exact))
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[1:]))
    print(json.dumps({"pruned": pruned, "loaded": loaded, "file": razor_jax.__file__}))
""")


def _run(python, code, *args, **kwargs):
  proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True,
                        timeout=600, **kwargs)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_imports_none_of_the_extras():
  """razor_jax, its ViT and a RazorDense gradient, in a fresh process."""
  result = _run(sys.executable, _GRADIENT, *EXTRA_MODULES)
  assert result["pruned"]
  assert result["loaded"] == [], f"the core imported {result['loaded']}"


def test_the_trainer_imports_tensorflow_only_for_data():
  code = textwrap.dedent("""
      import json, sys
      import razor_jax.train
      from razor_jax.train import cli
      print(json.dumps(sorted({m.split(".")[0] for m in sys.modules}
                              & {"tensorflow", "tensorflow_datasets", "sklearn"})))
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_fresh_venv_without_extras(tmp_path):
  """`pip install .` into a new virtual environment: the core dependencies only."""
  env_dir = tmp_path / "venv"
  venv.EnvBuilder(with_pip=True).create(env_dir)
  python = str(env_dir / "bin" / "python")
  # Built from a copy, so the checkout gains no build/ or egg-info.
  source = tmp_path / "source"
  _copy_tree(REPO, source)
  install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)],
                           capture_output=True, text=True, timeout=1800)
  if install.returncode != 0:
    if any(s in install.stderr for s in ("No matching distribution", "Could not find a version",
                                         "NewConnectionError", "Temporary failure in name")):
      pytest.skip(f"pip cannot reach a package index: {install.stderr.strip()[-300:]}")
    raise AssertionError(install.stderr[-3000:])
  installed = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True,
                             check=True).stdout.lower().splitlines()
  assert any(line.startswith("flax==") for line in installed), installed
  # (flax itself depends on orbax-checkpoint, so orbax is installed, just not imported.)
  for extra in ("tensorflow", "scikit-learn", "ml-collections", "tensorboardx"):
    assert not any(line.startswith(extra) for line in installed), (extra, installed)
  result = _run(python, _GRADIENT, *EXTRA_MODULES, cwd=str(tmp_path))
  assert result["pruned"] and result["loaded"] == []
  assert result["file"].startswith(str(env_dir))  # the installed copy, not the checkout


def _copy_tree(repo, dest):
  """What a build reads: the package, its metadata and README."""
  shutil.copytree(os.path.join(repo, "razor_jax"), dest / "razor_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(repo, name), dest / name)
