"""Shared test setup: 8 CPU devices for the sharding tests; the checkout's benchmarks/."""
import os
import sys

# Must happen before jax initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# benchmarks/ is a folder of the checkout, not an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
