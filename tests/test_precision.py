"""In which precision the contrastive part of a bf16 model runs: float32, full precision.

The towers compute in the model's dtype; the projection heads, the normalised embeddings,
the logits and the loss run in float32 with every matmul at HIGHEST precision, so a TPU
(whose default precision rounds matmul inputs to bf16) computes logits exactly.
"""
import jax
import jax.numpy as jnp
import numpy as np

from configs import demo
from mmcl import models
from mmcl.losses import distributed
from mmcl.train import loop


def _eqns(jaxpr, inside=()):
  """(equation, names of the enclosing higher-order primitives) over nested jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn, inside
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from _eqns(sub, inside + (eqn.primitive.name,))


def _bf16_config():
  c = demo.get_config('tiny')
  c.model.dtype = 'bfloat16'
  c.progress_bar = False
  return c


def test_loss_and_heads_of_a_bf16_model_run_in_float32_at_highest_precision():
  c = _bf16_config()
  s = loop.setup(c)
  jaxpr = jax.make_jaxpr(s.train_step)(s.sharded_abstract_state(), s.batch_shapes)
  dots = [(e, inside) for e, inside in _eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
  in_loss = [e for e, inside in dots if 'shard_map' in inside]
  assert len(in_loss) >= 4, 'logits forward and backward, both directions'
  for e in in_loss:
    assert all(v.aval.dtype == jnp.float32 for v in e.invars), e
    assert e.params['precision'] == (jax.lax.Precision.HIGHEST,) * 2, e
  d = c.model.embed_dim
  # The projection heads: pooled features [B, width] @ kernel [width, D] -> [B, D].
  heads = [e for e, inside in dots if 'shard_map' not in inside and
           e.outvars[0].aval.shape == (c.batch_size, d)]
  assert len(heads) >= 2, 'one projection head per tower'
  for e in heads:
    assert e.params['precision'] == (jax.lax.Precision.HIGHEST,) * 2, e
  # The towers' bodies stay in bf16.
  assert any(all(v.aval.dtype == jnp.bfloat16 for v in e.invars) for e, _ in dots)


def test_bf16_model_loss_is_close_to_the_float32_loss_of_the_same_parameters():
  c = _bf16_config()
  net16 = models.get_model(c.model)
  c.model.dtype = 'float32'
  net32 = models.get_model(c.model)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(-1, 1, (32, 64, 64, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(1, 258, (32, c.text_len)), jnp.int32)
  params = net32.init(jax.random.key(0), image, text)['params']
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  loss_fn = distributed.make_loss_fn('softmax', 'gather', mesh)
  losses = {}
  for name, net in (('bf16', net16), ('f32', net32)):
    zimg, ztxt, out = net.apply({'params': params}, image, text)
    assert zimg.dtype == ztxt.dtype == jnp.float32
    # A CLIP-like scale of 100 magnifies embedding error into the logits.
    losses[name] = float(loss_fn(zimg, ztxt, jnp.float32(100.0))[0])
  # bf16 towers change the embeddings by ~1e-2 relative; the loss follows that, no more.
  assert abs(losses['bf16'] - losses['f32']) < 0.05 * losses['f32'], losses
