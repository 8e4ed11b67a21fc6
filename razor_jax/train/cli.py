"""The command line of experiments/finetune.py: absl flags with ml_collections' config flag.

  --config NAME|PATH      experiments/configs/NAME.py (or a config file's path), whose
                          get_config() is the run
  --config.FIELD=VALUE    sets a field, nested ones with dots (--config.optimizer.name=adam)
  --workdir DIR           checkpoints and metrics; rerunning with it resumes (default
                          workdir/NAME)

`--config` is `config_flags.DEFINE_config_file`, as in vit_jax, big_vision and the flax
examples: the config is locked, so an override names a field it has, parsed as that
field's type. Every field, its default and meaning: razor_jax/train/config.py.

Mistakes the user can fix (an unknown config or key, a bad value, a missing dataset or
checkpoint, a batch that does not split over the devices) end with one message and a
non-zero exit status, not a traceback.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Sequence

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from razor_jax.train import config as train_config
from razor_jax.train import loop, sharding

USAGE = ("usage: python experiments/finetune.py --config NAME [--config.FIELD=VALUE ...]"
         " [--workdir DIR]")
EXIT_USAGE, EXIT_ERROR, EXIT_PREEMPTED = 2, 1, 143  # 143 = 128 + SIGTERM, as shells report
_PROGRAM = "finetune.py"


class UsageError(Exception):
  """A command line that names no valid config, key or value."""


def config_names(configs_dir: str) -> list[str]:
  """The NAMEs of configs_dir/NAME.py (files starting with "_" are helpers, not configs)."""
  return sorted(f[:-3] for f in os.listdir(configs_dir)
                if f.endswith(".py") and not f.startswith("_"))


def config_file(name: str, configs_dir: str) -> str:
  """The file `--config NAME` means: configs_dir/NAME.py for a short name, else a path.

  A path may end in ":ARG", which config_flags passes to get_config.
  """
  names = config_names(configs_dir)
  if name in names:
    return os.path.join(configs_dir, f"{name}.py")
  if os.path.isfile(name.split(":", 1)[0]):
    return name
  raise UsageError(f"unknown config {name!r}{train_config.suggest(name, names)}; valid configs:"
                   f" {', '.join(names)} (or the path of a config file)")


def _config_value(argv: Sequence[str]) -> tuple[int, str]:
  """(index, value) of the --config flag in argv; raises UsageError when it is absent."""
  for i, arg in enumerate(argv):
    if arg == "--config":
      if i + 1 == len(argv):
        raise UsageError("--config needs a value: a config name or file")
      return i, argv[i + 1]
    if arg.startswith("--config="):
      return i, arg[len("--config="):]
  raise UsageError("--config NAME is required")


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """(dotted key, raw value or "") of every --config.KEY argument."""
  found = []
  for i, arg in enumerate(argv):
    match = re.match(r"^--(?:no)?config\.([^=]+)(?:=(.*))?$", arg, re.S)
    if match:
      raw = match.group(2)
      if raw is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        raw = argv[i + 1]
      found.append((match.group(1), raw or ""))
  return found


def _parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """A fresh set of this command's flags, parsed from argv (program name first)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "a config file whose get_config() returns the run's ConfigDict",
      flag_values=flag_values, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "checkpoints and metrics go here",
                      flag_values=flag_values)
  rest = flag_values(list(argv))
  if len(rest) > 1:
    raise UsageError(f"unexpected argument {rest[1]!r}")
  return flag_values


def _bad_value(error: flags.Error, base: ml_collections.ConfigDict) -> str:
  """The message for an override absl could not parse as its field's type."""
  match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)$", str(error), re.S)
  if not match:
    return str(error)
  dotted, raw, reason = match.groups()
  *parents, leaf = dotted.split(".")
  node = base
  for part in parents:
    node = node[part]
  field_type = node.get_type(leaf)
  return (f"--config.{dotted}={raw!r}: expected {field_type.__name__} (the field holds"
          f" {node[leaf]!r}); {reason}")


def parse(argv: Sequence[str], configs_dir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(locked config with the overrides applied, workdir) from `argv` (no program name)."""
  argv = list(argv)
  index, name = _config_value(argv)
  early = [arg for arg in argv[:index] if re.match(r"^--(no)?config\.", arg)]
  if early:
    raise UsageError(f"{early[0]} comes before --config; put --config NAME first, then the"
                     " overrides of its fields")
  path = config_file(name, configs_dir)
  argv[index:index + (1 if argv[index].startswith("--config=") else 2)] = [f"--config={path}"]
  # The config alone first, so that a misspelled key is reported with the valid ones.
  base = _parse_flags([_PROGRAM, f"--config={path}"]).config
  try:
    train_config.check_keys(base, [dotted for dotted, _ in _overrides(argv)])
  except KeyError as e:
    raise UsageError(e.args[0]) from None
  try:
    flag_values = _parse_flags([_PROGRAM] + argv)
  except flags.IllegalFlagValueError as e:
    raise UsageError(_bad_value(e, base)) from None
  except flags.Error as e:
    raise UsageError(str(e)) from None
  workdir = flag_values.workdir or os.path.join(
      "workdir", os.path.splitext(os.path.basename(path.split(":", 1)[0]))[0])
  return flag_values.config, workdir


def load_config(name: str, configs_dir: str) -> ml_collections.ConfigDict:
  """The locked config that `--config NAME` gives, for use from Python."""
  return parse(["--config", name], configs_dir)[0]


def main(argv: Sequence[str], configs_dir: str) -> int:
  """Runs the command line `argv` (without the program name); returns the exit status."""
  if "-h" in argv or "--help" in argv:
    sections = __doc__.split("\n\n")
    print(f"{USAGE}\n\n{sections[1]}\n\n{sections[2]}\n\nconfigs:"
          f" {', '.join(config_names(configs_dir))}")
    return 0
  try:
    config, workdir = parse(argv, configs_dir)
  except UsageError as e:
    print(f"error: {e}\n{USAGE}", file=sys.stderr)
    return EXIT_USAGE
  try:  # the workdir, a changed config, init_path: seconds, before jax or TensorFlow start
    loop.preflight(config, workdir)
  except (loop.UserError, sharding.DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  # The data pipelines import TensorFlow: only now that a run starts.
  from razor_jax import data  # pylint: disable=g-import-not-at-top
  try:
    result = loop.run(config, workdir, datasets=data)
  except KeyboardInterrupt:
    print(f"\ninterrupted; rerun the same command to resume from the last checkpoint in"
          f" {workdir}", file=sys.stderr)
    return 130
  except (loop.UserError, data.DatasetMissingError, sharding.DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  if result.get("preempted"):
    return EXIT_PREEMPTED
  accuracy = result.get("eval/accuracy")
  if jax.process_index() == 0:  # one line for the run, not one per process
    print(f"done: step {result['step']}, eval accuracy "
          f"{'n/a' if accuracy is None else f'{accuracy:.4f}'}; workdir {workdir}")
  return 0
