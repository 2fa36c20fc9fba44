"""MoE layer: routing semantics on hand-built gates, aux losses vs numpy formulas, the whole
layer vs a float64 numpy loop, expert-parallel (shard_map + all_to_all) vs unsharded."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from mmcl.models import moe, transformer

AUTO = jax.sharding.AxisType.Auto


def _route(gates, k, capacity, bpr):
  combine, kept, experts = moe.route(jnp.asarray([gates], jnp.float32), k=k,
                                     capacity=capacity, bpr=bpr)
  return np.asarray(combine[0]), np.asarray(kept[0]), np.asarray(experts[0])


def test_topk_choice_and_weights():
  gates = [[0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.1, 0.3], [0.2, 0.2, 0.5, 0.1]]
  combine, kept, experts = _route(gates, k=2, capacity=3, bpr=False)
  np.testing.assert_array_equal(experts, [[1, 2], [0, 3], [2, 0]])
  assert kept.all()
  # Weights are the (un-renormalised) gates of the chosen experts, zero elsewhere.
  np.testing.assert_allclose(combine.sum(-1), [[0, .6, .2, 0], [.5, 0, 0, .3], [.2, 0, .5, 0]],
                             rtol=1e-6)
  combine1, _, experts1 = _route(gates, k=1, capacity=3, bpr=False)
  np.testing.assert_array_equal(experts1[:, 0], [1, 0, 2])
  np.testing.assert_allclose(combine1.sum((1, 2)), [.6, .5, .5], rtol=1e-6)


def test_capacity_overflow_drops_later_tokens():
  gates = [[0.7, 0.1, 0.1, 0.1]] * 3 + [[0.1, 0.7, 0.1, 0.1]]
  combine, kept, _ = _route(gates, k=1, capacity=2, bpr=False)
  np.testing.assert_array_equal(kept[:, 0], [True, True, False, True])
  assert combine[2].sum() == 0  # Dropped: no expert output, the residual passes.
  # Buffer places in token order: token 0 -> slot 0, token 1 -> slot 1 of expert 0.
  assert combine[0, 0, 0] > 0 and combine[1, 0, 1] > 0 and combine[3, 1, 0] > 0


def test_top1_choices_take_places_before_top2():
  # Token 0 ranks expert 0 second; tokens 1 and 2 rank it first. Capacity 2: the two
  # first choices win although token 0 comes first.
  gates = [[0.3, 0.5, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1], [0.6, 0.1, 0.1, 0.2]]
  combine, kept, experts = _route(gates, k=2, capacity=2, bpr=False)
  np.testing.assert_array_equal(experts[:, 0], [1, 0, 0])
  np.testing.assert_array_equal(kept, [[True, False], [True, True], [True, True]])
  assert combine[0, 0].sum() == 0 and combine[0, 1].sum() > 0


@pytest.mark.parametrize('bpr,want', [(False, [True, True, False, False]),
                                      (True, [False, True, False, True])])
def test_bpr_keeps_highest_gate_tokens(bpr, want):
  tops = [0.5, 0.9, 0.6, 0.8]
  gates = [[t, (1 - t) / 3, (1 - t) / 3, (1 - t) / 3] for t in tops]
  combine, kept, _ = _route(gates, k=1, capacity=2, bpr=bpr)
  np.testing.assert_array_equal(kept[:, 0], want)
  if bpr:  # Places in priority order: the 0.9 token gets slot 0, the 0.8 token slot 1.
    assert combine[1, 0, 0] > 0 and combine[3, 0, 1] > 0


@pytest.mark.parametrize('bpr', [False, True])
def test_unrouted_tokens_take_no_place(bpr):
  # All four tokens want expert 0 (capacity 2); token 0, with the highest gate, is padding.
  gates = jnp.asarray([[[0.9, 0.1]] + [[0.6, 0.4]] * 3], jnp.float32)
  valid = jnp.asarray([[False, True, True, True]])
  combine, kept, _ = moe.route(gates, k=1, capacity=2, bpr=bpr, valid_GxS=valid)
  np.testing.assert_array_equal(kept[0, :, 0], [False, True, True, False])
  assert float(combine[0, 0].sum()) == 0  # No output for the padding token.
  assert float(combine[0, 1, 0, 0]) > 0 and float(combine[0, 2, 0, 1]) > 0  # Slots 0 and 1.


# ---- The whole layer against a float64 numpy loop. ----------------------------------------

def _params(rng, m, e, h, scale=1.0):
  return {'router': scale * rng.standard_normal((m, e)) / math.sqrt(m),
          'wi': rng.standard_normal((e, m, h)) / math.sqrt(m), 'bi': 0.1 * rng.standard_normal((e, h)),
          'wo': rng.standard_normal((e, h, m)) / math.sqrt(h), 'bo': 0.1 * rng.standard_normal((e, m))}


def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _gelu(x):  # flax's nn.gelu default: the tanh approximation.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _entropy(p):
  return -np.sum(p * np.log(np.maximum(p, 1e-9)), -1)


def _cv2(v):
  return np.var(v, -1) / np.mean(v, -1)**2


def _numpy_moe(p, x, noise, spec, tau, weights, train=True, valid=None):
  """Token by token: routing, buffers, experts and every aux loss from their formulas.
  `valid` [B, L]: tokens to route; the others take no place and count in no statistic."""
  b, l, m = x.shape
  e, k = spec.num_experts, spec.k
  s = spec.group_size
  g = b * l // s
  cap = math.ceil(s * k * spec.capacity_factor / e)
  xs = x.reshape(g, s, m)
  logits = xs @ p['router']
  noisy = logits + (0 if noise is None else noise.reshape(g, s, e))
  probs, gates = _softmax(logits), _softmax(noisy)
  w = np.ones((g, s)) if valid is None else valid.reshape(g, s).astype(float)
  y, kept_any = np.zeros_like(xs), np.zeros((g, s), bool)
  for gi in range(g):
    choice = np.argsort(-gates[gi], -1, kind='stable')[:, :k]
    order = np.argsort(-gates[gi].max(-1), kind='stable') if spec.bpr else np.arange(s)
    fill = np.zeros(e, int)
    for r in range(k):  # All first choices, then all second choices.
      for t in order:
        if not w[gi, t]:
          continue
        ex = choice[t, r]
        if fill[ex] < cap:
          fill[ex] += 1
          kept_any[gi, t] = True
          hid = _gelu(xs[gi, t] @ p['wi'][ex] + p['bi'][ex])
          y[gi, t] += gates[gi, t, ex] * (hid @ p['wo'][ex] + p['bo'][ex])
  if noise is not None and train:
    kth = np.sort(noisy, -1)[..., -k]
    std = 1.0 / e if spec.noise_std is None else spec.noise_std
    load = 1 - 0.5 * (1 + special.erf((kth[..., None] - logits) / std / np.sqrt(2)))
  else:
    load = np.zeros_like(gates)
    for r in range(k):
      load += np.eye(e)[np.argsort(-gates, -1, kind='stable')[..., r]]
  wx = w[..., None]
  mean_p = (probs * wx).reshape(-1, e).sum(0) / w.sum()
  losses = {'importance_loss': _cv2((probs * wx).sum(1)).mean(),
            'load_loss': _cv2((load * wx).sum(1) / wx.sum(1)).mean(),
            'local_entropy_loss': (_entropy(probs) * w).sum() / w.sum(),
            'global_entropy_loss': max(0.0, tau - _entropy(mean_p))}
  losses['loss'] = sum(weights[n] * losses[n] for n in weights)
  losses['dropped'] = ((1 - kept_any) * w).sum() / w.sum()
  top1 = (np.eye(e)[gates.argmax(-1)] * wx).reshape(-1, e).sum(0) / w.sum()
  losses.update({f'expert{i}': top1[i] for i in range(e)})
  return y.reshape(b, l, m), losses, (~kept_any & (w > 0)).reshape(b, l)


WEIGHTS = dict(importance_weight=0.5, load_weight=0.25, local_entropy_weight=0.125,
               global_entropy_weight=2.0)


@pytest.mark.parametrize('k,bpr,noisy,masked', [(1, True, True, False), (2, False, True, False),
                                                (2, True, False, False), (1, True, True, True),
                                                (2, False, False, True)])
def test_layer_and_aux_losses_match_numpy(k, bpr, noisy, masked):
  e, b, l, m, h = 4, 4, 6, 8, 16
  rng = np.random.default_rng(k + 2 * bpr)
  spec = moe.MoeSpec.make(dict(num_experts=e, k=k, group_size=12, capacity_factor=0.75 / k,
                               bpr=bpr, noise_std=0.3, global_entropy_tau=1.3, **WEIGHTS))
  p = _params(rng, m, e, h, scale=3.0)  # Peaked gates, so capacity overflows.
  x = rng.standard_normal((b, l, m))
  noise = 0.3 * rng.standard_normal((b, l, e)) if noisy else None
  # Masked: rows padded after 2..6 tokens, as causal text after its EOT.
  valid = np.arange(l)[None] < np.array([[2], [6], [3], [5]]) if masked else None
  want_y, want, want_dropped = _numpy_moe(
      p, x, noise, spec, 1.3, {f'{n}_loss': v for n, v in
                               ((w[:-7], v) for w, v in WEIGHTS.items())}, valid=valid)
  with jax.enable_x64(True):
    y, stats, dropped = jax.jit(lambda p, x, z, v: moe.moe_apply(
        p, x, z, v, spec=spec, train=True))(p, x, noise, valid)
    assert y.dtype == jnp.float64
  if masked:  # Unrouted tokens: zero output (the residual passes), never 'dropped'.
    assert not np.asarray(y)[~valid].any() and not np.asarray(dropped)[~valid].any()
  assert 0 < want['dropped'] < 0.5, want['dropped']  # The test exercises overflow.
  np.testing.assert_array_equal(dropped, want_dropped)
  np.testing.assert_allclose(y, want_y, rtol=1e-9, atol=1e-9)
  for name, v in want.items():
    np.testing.assert_allclose(stats[name], v, rtol=1e-6, atol=1e-9, err_msg=name)


def test_global_entropy_only_penalised_below_tau():
  rng = np.random.default_rng(0)
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _params(rng, 8, 4, 16))
  x = jnp.asarray(rng.standard_normal((2, 8, 8)), jnp.float32)
  stats = [jax.jit(lambda p, x, t=t: moe.moe_apply(
      p, x, spec=moe.MoeSpec.make(dict(num_experts=4, global_entropy_tau=t)), train=False)[1])(
          p, x) for t in (0.5, 10.0)]
  assert float(stats[0]['global_entropy_loss']) == 0.0  # H > 0.5: no penalty.
  np.testing.assert_allclose(stats[1]['global_entropy_loss'], 10 - stats[1]['global_entropy'],
                             rtol=1e-6)


def test_per_modality_weights():
  spec = moe.MoeSpec.make(dict(local_entropy_weight={'image': 0.5}))
  assert spec.per_modality('local_entropy_weight', 'image') == 0.5
  assert spec.per_modality('local_entropy_weight', 'text') == 0.0
  with pytest.raises(ValueError, match=r"keys \['audio'\]; valid: \('image', 'text'\)"):
    moe.MoeSpec.make(dict(local_entropy_weight={'audio': 1.0}))


def test_layer_placement_and_group_size():
  assert moe.MoeSpec.make({'every': 2}).layer_ids(12) == (1, 3, 5, 7, 9, 11)
  assert moe.MoeSpec.make({'layers': [3, 0]}).layer_ids(4) == (0, 3)
  assert moe.group_size_for(6272, 1024) == 896 and moe.group_size_for(16, 256) == 16
  assert moe.MoeSpec(num_experts=32, k=2, capacity_factor=1.25).capacity(256, True) == 20


# ---- Expert parallelism. --------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(4, 2), (2, 4)])
@pytest.mark.parametrize('k,masked', [(1, False), (2, False), (1, True)])
def test_sharded_equals_unsharded(shape, k, masked):
  e, b, l, m, h = 8, 16, 6, 8, 16  # 2 examples = 12 tokens = one group per device.
  rng = np.random.default_rng(k)
  spec = moe.MoeSpec.make(dict(num_experts=e, k=k, group_size=12, capacity_factor=1.0,
                               noise_std=0.2, **WEIGHTS))
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _params(rng, m, e, h, scale=3.0))
  x = jnp.asarray(rng.standard_normal((b, l, m)), jnp.float32)
  noise = jnp.asarray(0.2 * rng.standard_normal((b, l, e)), jnp.float32)
  valid = jnp.arange(l)[None] < jnp.asarray(rng.integers(1, l + 1, (b, 1))) if masked else None
  mesh = jax.make_mesh(shape, ('data', 'expert'), axis_types=(AUTO, AUTO))

  def ref(p, x):
    return moe.moe_apply(p, x, noise, valid, spec=spec, train=True)

  def sharded(p, x):
    return moe.moe_sharded(p, x, noise, valid, spec=spec, train=True, mesh=mesh)

  def value_and_grad(f):  # Gradients too: shard_map transposes the all_to_alls and psums.
    def loss(p):
      out = f(p, x)
      return jnp.sum(out[0]**2) + out[1]['loss'], out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return out, grads

  (want, g_want), (got, g_got) = value_and_grad(ref), value_and_grad(sharded)
  assert 0 < float(want[1]['dropped']) < 1
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  for name in want[1]:
    np.testing.assert_allclose(got[1][name], want[1][name], rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_array_equal(got[2], want[2])
  for name in g_want:
    np.testing.assert_allclose(g_got[name], g_want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_compiled_dispatch_is_all_to_all():
  mesh = jax.make_mesh((4, 2), ('data', 'expert'), axis_types=(AUTO, AUTO))
  spec = moe.MoeSpec.make(dict(num_experts=4, group_size=8))
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _params(np.random.default_rng(0), 8, 4, 16))
  x = jnp.zeros((16, 4, 8))
  hlo = jax.jit(lambda p, x: moe.moe_sharded(p, x, spec=spec, train=False, mesh=mesh)).lower(
      p, x).compile().as_text()
  assert hlo.count('all-to-all(') >= 2, 'dispatch and return should be all-to-alls'
  # Expert weights are never gathered whole onto one device.
  assert 'all-gather' not in hlo


def test_module_takes_its_expert_mesh_as_an_argument():
  m = transformer.MoeMlp(spec=dict(num_experts=4, group_size=4), mlp_dim=16)
  x = jax.random.normal(jax.random.key(0), (8, 4, 8))
  v = jax.jit(m.init)(jax.random.key(1), x)
  want = jax.jit(m.apply)(v, x)
  mesh = jax.make_mesh((4, 2), ('data', 'expert'), axis_types=(AUTO, AUTO))
  compiled = jax.jit(m.clone(mesh=mesh).apply).lower(v, x).compile()
  assert 'all-to-all' in compiled.as_text()
  got = compiled(v, x)
  np.testing.assert_allclose(got[0], want[0], atol=1e-6)
  with jax.set_mesh(mesh):  # An ambient mesh is not read: no mesh argument, no dispatch.
    assert 'all-to-all' not in jax.jit(m.apply).lower(v, x).compile().as_text()
  bad = jax.make_mesh((1, 8), ('data', 'expert'), axis_types=(AUTO, AUTO))
  with pytest.raises(ValueError, match=r'num_experts=4 does not divide over the 8 devices'):
    jax.jit(m.clone(mesh=bad).apply)(v, x)


def test_gating_noise_only_in_training():
  m = transformer.MoeMlp(spec=dict(num_experts=4, group_size=8, noise_std=0.5, load_weight=1.0),
                 mlp_dim=16)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8))
  v = jax.jit(m.init)(jax.random.key(1), x)
  apply = jax.jit(lambda v, x, r: m.apply(v, x, train=True, rngs={'dropout': r}))
  a, b = apply(v, x, jax.random.key(2)), apply(v, x, jax.random.key(3))
  assert not np.allclose(a[0], b[0])  # Noise changes the gates (and so the outputs).
  evaluate = jax.jit(lambda v, x: m.apply(v, x, train=False))(v, x)  # No rng needed.
  want = moe.moe_apply(v['params'], x, spec=moe.MoeSpec.make(m.spec), train=False)
  np.testing.assert_allclose(evaluate[0], want[0], atol=1e-6)
  # The noisy load loss is differentiable (a smooth probability of selection).
  g = jax.jit(jax.grad(lambda p: m.apply({'params': p}, x, train=True,
                                         rngs={'dropout': jax.random.key(2)})[1]['loss']))(
                                             v['params'])
  assert float(jnp.abs(g['router']).max()) > 0
