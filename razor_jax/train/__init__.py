"""Fine-tuning a ViT or a CNN with Back Razor (the `train` extra); `run(config, workdir)`.

  config.py      every field the trainer reads, its default and meaning
  setup.py       checks, the model, the sharded TrainState, the compiled step
  step.py        the pure pieces: TrainState, the optimizer, train_step, eval_step
  loop.py        run(): the loop, evaluation, checkpoints, preemption
  sharding.py    multi-host start-up, the ("data", "fsdp") mesh, shardings
  checkpoint.py  orbax checkpoints of the TrainState
  metrics.py     JSON lines, TensorBoard events, the progress bar
  workdir.py     before a run: a writable workdir, a config that fits its checkpoint
  cli.py         the command line of experiments/finetune.py (absl flags)
  launch.py      N processes of one run on this machine (experiments/launch_local.sh)

Importing this package does not import TensorFlow: `run` imports the data pipelines
(razor_jax.data) once it needs data, unless it is given other datasets.
"""
from razor_jax.train.loop import evaluate, preflight, run
from razor_jax.train.setup import (CheckpointMissingError, CheckpointUnreadableError,
                                   ConfigError, NonFiniteLossError, UserError)
from razor_jax.train.workdir import ConfigChangedError, WorkdirError

__all__ = ["CheckpointMissingError", "CheckpointUnreadableError", "ConfigChangedError",
           "ConfigError", "NonFiniteLossError", "UserError", "WorkdirError", "evaluate",
           "preflight", "run"]
