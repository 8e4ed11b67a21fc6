"""The command line of experiments/finetune.py: a named config, overrides, a clean exit.

  --config NAME               experiments/configs/NAME.py, whose get_config() is the run
  --config.FIELD=VALUE        sets a field, nested ones with dots (--config.optimizer.name=adam)
  --workdir DIR               checkpoints and metrics; rerunning with it resumes (default
                              workdir/NAME)

Every field, its default and meaning: razor_jax/train_config.py.

Mistakes the user can fix (an unknown config or key, a missing dataset or checkpoint, a
batch that does not split over the devices) end with one message and a non-zero exit
status, not a traceback.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Optional, Sequence

import ml_collections

USAGE = ("usage: python experiments/finetune.py --config NAME [--config.FIELD=VALUE ...]"
         " [--workdir DIR]")
EXIT_USAGE, EXIT_ERROR, EXIT_PREEMPTED = 2, 1, 143  # 143 = 128 + SIGTERM, as shells report


class UsageError(Exception):
  """A command line that names no valid config, key or value."""


def config_names(configs_dir: str) -> list[str]:
  """The NAMEs of configs_dir/NAME.py (files starting with "_" are helpers, not configs)."""
  return sorted(f[:-3] for f in os.listdir(configs_dir)
                if f.endswith(".py") and not f.startswith("_"))


def _suggest(word: str, choices) -> str:
  close = difflib.get_close_matches(word, list(choices), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(name: str, configs_dir: str) -> ml_collections.ConfigDict:
  """get_config() of configs_dir/NAME.py, locked so a misspelled key cannot be added."""
  names = config_names(configs_dir)
  if name not in names:
    raise UsageError(f"unknown config {name!r}{_suggest(name, names)}; valid configs:"
                     f" {', '.join(names)}")
  path = os.path.join(configs_dir, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"razor_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()
  return config


def parse_args(argv: Sequence[str]) -> tuple[str, list[tuple[str, str]], Optional[str]]:
  """(config name, [(dotted key, raw value)], workdir or None) from the arguments."""
  name, workdir, overrides = None, None, []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if not arg.startswith("--"):
      raise UsageError(f"unexpected argument {arg!r}")
    key, has_value, value = arg[2:].partition("=")
    if not has_value:
      if not args:
        raise UsageError(f"{arg} needs a value")
      value = args.pop(0)
    if key == "config":
      name = value
    elif key == "workdir":
      workdir = value
    elif key.startswith("config."):
      overrides.append((key[len("config."):], value))
    else:
      raise UsageError(f"unknown flag --{key}{_suggest(key, ['config', 'workdir'])}")
  if name is None:
    raise UsageError("--config NAME is required")
  return name, overrides, workdir


def _parse_value(raw: str, field_type, current):
  if field_type is bool:
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError("expected true or false")
  if raw in ("None", "none", "null") and (current is None or field_type is type(None)):
    return None
  if field_type is int:
    return int(raw)
  if field_type is float:
    return float(raw)
  if field_type is str:
    return raw
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def apply_override(config: ml_collections.ConfigDict, dotted: str, raw: str):
  """Sets config.<dotted> from the text `raw`, parsed as the field's type."""
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    if part not in node:
      where = f" under {'.'.join(parts[:i])!r}" if i else ""
      raise UsageError(f"unknown config key {dotted!r}{_suggest(part, node.keys())}; valid keys"
                       f"{where}: {', '.join(sorted(node.keys()))}")
    if i < len(parts) - 1:
      node = node[part]
      if not isinstance(node, ml_collections.ConfigDict):
        raise UsageError(f"config key {'.'.join(parts[:i + 1])!r} is a value, not a group")
  key = parts[-1]
  if isinstance(node[key], ml_collections.ConfigDict):
    raise UsageError(f"config key {dotted!r} is a group; set one of its fields:"
                     f" {', '.join(sorted(node[key].keys()))}")
  field_type = node.get_type(key)
  try:
    node[key] = _parse_value(raw, field_type, node[key])
  except (TypeError, ValueError) as e:
    raise UsageError(f"--config.{dotted}={raw!r}: expected {field_type.__name__}"
                     f" (the field now holds {node[key]!r}); {e}") from None


def _is_user_error(e: BaseException) -> bool:
  from razor_jax import train  # pylint: disable=g-import-not-at-top
  if isinstance(e, train.UserError):
    return True
  data = sys.modules.get("razor_jax.data")  # only loaded once a dataset was touched
  missing = getattr(data, "DatasetMissingError", None)
  return missing is not None and isinstance(e, missing)


def main(argv: Sequence[str], configs_dir: str) -> int:
  """Runs the command line `argv` (without the program name); returns the exit status."""
  if "-h" in argv or "--help" in argv:
    sections = __doc__.split("\n\n")
    print(f"{USAGE}\n\n{sections[1]}\n\n{sections[2]}\n\nconfigs:"
          f" {', '.join(config_names(configs_dir))}")
    return 0
  try:
    name, overrides, workdir = parse_args(argv)
    config = load_config(name, configs_dir)
    for dotted, raw in overrides:
      apply_override(config, dotted, raw)
  except UsageError as e:
    print(f"error: {e}\n{USAGE}", file=sys.stderr)
    return EXIT_USAGE
  workdir = workdir or os.path.join("workdir", name)
  from razor_jax import train  # pylint: disable=g-import-not-at-top
  try:
    result = train.run(config, workdir)
  except KeyboardInterrupt:
    print(f"\ninterrupted; rerun the same command to resume from the last checkpoint in"
          f" {workdir}", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e):
      raise
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  if result.get("preempted"):
    return EXIT_PREEMPTED
  accuracy = result.get("eval/accuracy")
  print(f"done: step {result['step']}, eval accuracy "
        f"{'n/a' if accuracy is None else f'{accuracy:.4f}'}; workdir {workdir}")
  return 0
