"""Test setup: 8 forced host devices and strict rank promotion.

Float64 references use the `with jax.enable_x64(True):` context in the tests that need them.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

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
