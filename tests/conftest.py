"""Shared test setup: 8 CPU devices for the sharding tests, float32 matmuls exact."""
import os

# Must happen before jax initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
