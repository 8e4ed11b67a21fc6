"""A fine-tuning run as `processes` hosts would feed it, in one process: the tests' reference.

  python tests/multiprocess_child.py PROCESSES FINETUNE_FLAGS...

Each host's pipeline reads its own shard of the data (razor_jax.data), so one process
sees the batches of N processes only when it reads every host's part and puts them
together in host order, as the global batch of N processes is laid out. Evaluation
stays one process's own: the tests compare it with N processes' evaluation.
"""
import json
import os
import sys

import numpy as np

from razor_jax.train import cli, loop

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "configs")


class AsProcesses:
  """razor_jax.data, with train batches made of `count` hosts' batches side by side."""

  def __init__(self, data, count: int):
    self._data, self._count = data, count

  def __getattr__(self, name):
    return getattr(self._data, name)

  def train_batches(self, name, **kwargs):
    hosts = [self._data.train_batches(name, **kwargs, process_index=i, process_count=self._count)
             for i in range(self._count)]
    for parts in zip(*hosts):
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main(argv):
  from razor_jax import data  # pylint: disable=g-import-not-at-top
  processes = int(argv[0])
  config, workdir = cli.parse(argv[1:], CONFIGS_DIR)
  result = loop.run(config, workdir, datasets=AsProcesses(data, processes))
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
