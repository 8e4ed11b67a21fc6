"""Which razor_jax a figure was measured with: results name the commit."""
from __future__ import annotations

import os
import subprocess
from typing import Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version() -> Optional[str]:
  """The short commit of the razor_jax being run, "+modified" if its library files
  (razor_jax/) differ from it; None outside a git checkout."""
  git = lambda *a: subprocess.run(["git", "-C", _ROOT, *a], capture_output=True, text=True,
                                  check=True).stdout.strip()
  try:
    commit = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "razor_jax")
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+modified" if changed else "")
