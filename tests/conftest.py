"""Test setup: 8 forced host devices and strict rank promotion.

Float64 references use the `with jax.enable_x64(True):` context in the tests that need them.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Compiled programs are cached on disk and shared by the tests, the xdist workers and the
# tools' subprocesses (they inherit the environment): the suite compiles the same small steps
# many times over (a tools/train.py demo run: 46 s cold, 24 s warm). An entry is keyed by the
# program, the compile options, the devices and the jax version, so a hit is the executable a
# compile would give; cost_analysis() and memory_analysis() read the same from it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"mmcl_tests_jax_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must follow the XLA_FLAGS line)

jax.config.update("jax_numpy_rank_promotion", "raise")

try:  # Keep tf.data off the accelerator and quiet; tests use it only for input.
  import tensorflow as tf  # noqa: E402
  tf.config.set_visible_devices([], "GPU")
except ImportError:
  pass


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A TFDS data_dir holding `mmcl_shapes/tiny`, built once per session."""
  from mmcl.data import shapes  # Imported lazily: pulls in TFDS.
  data_dir = str(tmp_path_factory.mktemp("tfds_shapes"))
  shapes.prepare(data_dir, "tiny")
  return data_dir
