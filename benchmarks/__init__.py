"""Evidence for razor_jax: memory, step time, bits, gradient fidelity and transfer accuracy.

Not installed with razor_jax: run it from a checkout, `python benchmarks/run.py ...` (or
`python experiments/benchmark.py ...`); results/ regenerates from it. It needs the
`train` extra (it compiles the trainer's step) and `bench` (matplotlib) for the plots.

  cases.py     what one measurement is (model, batch, method) and its train config
  step.py      the trainer's compiled step for a case; packed bits by tracing
  child.py     measured peak in a fresh process (RSS on CPU, peak_bytes_in_use on GPU)
  measure.py   step times taken in turns; per-layer gradient cosines
  gpu_aot.py   the step compiled for a described GPU without one (gpu/<target>.txtpb)
  gpu_time.py  the modeled GPU step time of an optimized HLO module
  suite.py     plans (full, quick, gpu) and running them into records
  records.py   the JSON records and their required keys
  report.py    results/README.md tables, beside the paper's figures (paper.py)
  gpu_report.py  its GPU-compiled sections: beside CPU-compiled, modeled step times
  plots.py     memory against batch size; GPU-compiled memory against modeled time
  render.py    README and plots from a results folder
  accuracy.py  the transfer-accuracy sweep on the offline demo
  version.py   the commit a figure was measured with
  cli.py       the command line of run.py and experiments/benchmark.py
  run.py       python benchmarks/run.py [--quick | --gpu | --gpu_aot | --render | --merge JSON]
"""
