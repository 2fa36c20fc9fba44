"""The worked example of docs/losses.md runs as written, with every impl it registers."""
import functools
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl import losses
from mmcl.parallel import mesh as mesh_lib

DOC = os.path.join(os.path.dirname(__file__), '..', 'docs', 'losses.md')


@pytest.fixture(scope='module')
def smooth_softmax():
  """Executes the guide's example file, registering 'smooth_softmax' once."""
  text = open(DOC).read()
  match = re.search(r'<!-- example: (\S+) .*?-->\n```python\n(.*?)```', text, re.S)
  assert match, 'docs/losses.md lost its worked example'
  if 'smooth_softmax' not in losses.registered_losses():
    module = types.ModuleType('mmcl.losses.smooth_softmax')
    exec(compile(match.group(2), match.group(1), 'exec'), module.__dict__)
  return losses.get_loss('smooth_softmax', 'global')


def _reference(zimg, ztxt, scale, eps):
  logits = scale * zimg @ ztxt.T
  n = logits.shape[0]
  targets = (1 - eps) * jnp.eye(n) + eps / n
  i2t = -jnp.sum(targets * jax.nn.log_softmax(logits, 1)) / n
  t2i = -jnp.sum(targets * jax.nn.log_softmax(logits, 0)) / n
  return (i2t + t2i) / 2


@pytest.mark.parametrize('impl', ['global', 'gather', 'ring'])
def test_worked_example_matches_label_smoothing(smooth_softmax, impl):
  assert smooth_softmax.impls == ('global', 'gather', 'ring')
  mesh = mesh_lib.create_mesh([('data', 4), ('fsdp', 2)])
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 32, 8))
  zimg, ztxt = z / np.linalg.norm(z, axis=-1, keepdims=True)
  fn = losses.make_loss_fn('smooth_softmax', impl, mesh, chunk=2, eps=0.2)
  sharding = mesh_lib.batch_sharding(mesh)
  value, grads = jax.jit(jax.value_and_grad(lambda a, b, s: fn(a, b, s)[0], (0, 1, 2)))(
      jax.device_put(zimg.astype(np.float32), sharding),
      jax.device_put(ztxt.astype(np.float32), sharding), jnp.float32(5.0))
  with jax.enable_x64(True):
    ref_value, ref_grads = jax.value_and_grad(
        functools.partial(_reference, eps=0.2), (0, 1, 2))(
            jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float64(5.0))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
