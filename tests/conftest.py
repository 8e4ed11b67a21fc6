"""Shared test setup: 8 CPU devices for the sharding tests; the checkout's benchmarks/."""
import os
import sys

# Must happen before jax initializes its backends. Compiling dominates the suite's time, and
# much of a compile is LLVM's: at optimization level 0 the suite ran 28:04 -> 25:46 with
# `-n 2` on 2 cores (test_vit, test_train_loop and test_paper alone: 370 s -> 259 s). HLO
# passes, fusion and buffer assignment are XLA's and unchanged, so every result and every
# compiled memory figure is the same; no test times execution against a fixed bound.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8"
                      " --xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# benchmarks/ is a folder of the checkout, not an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
