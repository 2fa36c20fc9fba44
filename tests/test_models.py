"""Tests for mmcl.models: towers, pooling, precision, remat, temperature."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmcl import models
from mmcl.models import text as text_lib
from mmcl.models import transformer
from mmcl.models import vit

B, IMG, VOCAB, EMBED = 2, 32, 50, 16
KEY = jax.random.PRNGKey(0)


def _image(b=B):
  return jax.random.normal(jax.random.PRNGKey(1), (b, IMG, IMG, 3))


def _text():
  # Right-padded; the last non-pad token (EOS=2) is the EOT.
  return jnp.array([[5, 6, 7, 2, 0, 0, 0, 0],
                    [9, 8, 7, 6, 5, 4, 3, 2]], jnp.int32)


def _two_towers(image=None, text=None, **kw):
  cfg = dict(
      name='two_towers',
      image={'variant': 'pico/8', 'pool': 'tok', **(image or {})},
      text={'variant': 'pico', 'style': 'clip', 'vocab_size': VOCAB,
            'max_len': 16, **(text or {})},
      embed_dim=EMBED, temperature_init=1 / 0.07, max_temperature=100.0)
  cfg.update(kw)
  return models.get_model(ml_collections.ConfigDict(cfg))


def _text_model(**kw):
  kw = {'variant': 'pico', 'vocab_size': VOCAB, 'max_len': 16,
        'num_classes': EMBED, **kw}
  return text_lib.TextTransformer(**kw)


def _fake_params(model, *args):
  """Random params shaped like `model.init`'s, drawn in numpy.

  Real inits compile every initializer with XLA (seconds each on CPU);
  these tests only need some well-scaled weights.
  """
  rng = np.random.default_rng(0)

  def make(path, leaf):
    shape = leaf.shape
    x = rng.standard_normal(shape)
    if path[-1].key == 'scale':
      x = 1.0 + 0.1 * x
    elif len(shape) >= 2:
      x = x / math.sqrt(math.prod(shape[:-1]))
    else:
      x = 0.1 * x
    return jnp.asarray(x, leaf.dtype)

  shapes = jax.eval_shape(model.init, KEY, *args)
  return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope='module')
def tt_params():
  # A superset of every pooling's params (class token + MAP heads), so one
  # param tree serves all tests: linen ignores unused params at apply time.
  model = _two_towers(image={'pool': 'map', 'class_token': True},
                      text={'pool': 'map'}, bias_init=-10.0)
  params = _fake_params(model, _image(), _text())
  # With no inputs only `t` and `b` are created: a cheap real init.
  params['params'].update(model.init(KEY, None, None)['params'])
  return params


@pytest.fixture(scope='module')
def vit_params(tt_params):
  return {'params': tt_params['params']['img']}


@pytest.fixture(scope='module')
def txt_params(tt_params):
  return {'params': tt_params['params']['txt']}


@pytest.mark.parametrize('pool', ['tok', 'gap', 'map'])
def test_vit_pool_shapes(vit_params, pool):
  model = vit.ViT(variant='pico/8', pool=pool, num_classes=EMBED)
  shapes = jax.eval_shape(model.init, KEY, _image())['params']
  assert ('cls' in shapes) == (pool == 'tok')
  assert ('MAPHead_0' in shapes) == (pool == 'map')
  assert shapes['pos_embedding'].shape == (1, 16, 64)
  model = model.clone(class_token=True)
  feat, out = model.apply(vit_params, _image())
  assert feat.shape == (B, EMBED)
  assert out['pre_logits'].shape == (B, 64)
  enc = out['encoded']
  assert enc.shape == (B, 17, 64)  # Class token + 4x4 patches.
  expected = {'tok': enc[:, 0], 'gap': jnp.mean(enc[:, 1:], axis=1)}
  if pool in expected:
    np.testing.assert_allclose(out['pre_logits'], expected[pool], atol=1e-6)
  assert np.all(np.isfinite(feat))


def test_vit_without_head_and_overrides():
  model = vit.ViT(variant='nano/8', width=32, depth=1, num_heads=2,
                  patch_size=16, num_classes=None)
  params = jax.eval_shape(model.init, KEY, _image())
  feat, _ = jax.eval_shape(model.apply, params, _image())
  assert feat.shape == (B, 32)
  assert 'head' not in params['params']
  assert params['params']['pos_embedding'].shape == (1, 4, 32)
  assert params['params']['Transformer']['encoderblock_0']['MlpBlock_0'][
      'Dense_0']['kernel'].shape == (32, 512)
  assert 'encoderblock_1' not in params['params']['Transformer']


@pytest.mark.parametrize('pool', ['eot', 'last', 'first', 'gap', 'map'])
def test_text_pool_shapes(txt_params, pool):
  model = _text_model(pool=pool)
  feat, out = model.apply(txt_params, _text())
  assert feat.shape == (B, EMBED)
  assert out['pre_logits'].shape == (B, 64)
  enc = out['encoded']
  expected = {'eot': jnp.stack([enc[0, 3], enc[1, 7]]), 'last': enc[:, -1],
              'first': enc[:, 0], 'gap': jnp.mean(enc, axis=1)}
  if pool in expected:
    np.testing.assert_allclose(out['pre_logits'], expected[pool], atol=1e-6)
  assert np.all(np.isfinite(feat))


def test_eot_index():
  tok = jnp.array([[5, 2, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0], [0, 7, 0, 0]])
  np.testing.assert_array_equal(text_lib.eot_index(tok), [1, 3, 0, 1])


def test_clip_text_is_causal_and_pools_eot(txt_params):
  model, params = _text_model(style='clip'), txt_params
  tok = _text()
  feat, out = model.apply(params, tok)
  np.testing.assert_allclose(out['pre_logits'][0], out['encoded'][0, 3])
  np.testing.assert_allclose(out['pre_logits'][1], out['encoded'][1, 7])

  # Tokens after position 3 do not affect positions <= 3 (causal mask)...
  changed = tok.at[:, 4:].set(11)
  _, out2 = model.apply(params, changed)
  np.testing.assert_allclose(out2['encoded'][:, :4], out['encoded'][:, :4],
                             atol=1e-6)
  assert not np.allclose(out2['encoded'][:, 4:], out['encoded'][:, 4:])
  # ...so extra padding after the EOT leaves the text feature unchanged.
  feat_short, _ = model.apply(params, tok[:1, :4])
  np.testing.assert_allclose(feat_short[0], feat[0], atol=1e-6)

  # A token before the EOT changes the feature.
  feat3, _ = model.apply(params, tok.at[0, 1].set(12))
  assert not np.allclose(feat3[0], feat[0], atol=1e-4)
  np.testing.assert_allclose(feat3[1], feat[1], atol=1e-6)


def test_siglip_text_pools_last_and_is_bidirectional(txt_params):
  model, params = _text_model(style='siglip'), txt_params
  tok = _text()
  _, out = model.apply(params, tok)
  np.testing.assert_allclose(out['pre_logits'], out['encoded'][:, -1])
  _, out2 = model.apply(params, tok.at[:, -1].set(11))
  assert not np.allclose(out2['encoded'][:, 0], out['encoded'][:, 0])


def test_param_counts_b16_and_so400m():
  init = lambda m: jax.eval_shape(m.init, KEY, jnp.zeros((1, 224, 224, 3)))
  n_b16 = transformer.count_params(init(vit.ViT(variant='B/16', pool='gap')))
  assert abs(n_b16 - 85.8e6) < 0.05e6, n_b16
  n_so = transformer.count_params(
      init(vit.ViT(variant='So400m/14', pool='map')))
  assert 400e6 < n_so < 430e6, n_so


def test_two_towers_param_tree_and_unit_norm(tt_params):
  model = _two_towers(bias_init=-10.0)
  params = jax.eval_shape(model.init, KEY, _image(), _text())['params']
  assert set(params) == {'img', 'txt', 't', 'b'}
  assert params['img']['head']['kernel'].shape == (64, EMBED)
  assert params['txt']['head']['kernel'].shape == (64, EMBED)
  assert params['t'].shape == () and params['b'].shape == ()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  zimg, ztxt, out = model.apply(tt_params, _image(), _text())
  assert zimg.shape == ztxt.shape == (B, EMBED)
  assert zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, atol=1e-5)
  assert out['b'] == -10.0


def test_two_towers_none_inputs(tt_params):
  model = _two_towers(bias_init=-10.0)
  zimg, ztxt, _ = model.apply(tt_params, _image(), _text())
  zimg2, none_txt, out = model.apply(tt_params, _image(), None)
  none_img, ztxt2, _ = model.apply(tt_params, None, _text())
  assert none_txt is None and none_img is None
  assert not any(k.startswith('txt/') for k in out)
  np.testing.assert_allclose(zimg2, zimg, atol=1e-6)
  np.testing.assert_allclose(ztxt2, ztxt, atol=1e-6)


def test_temperature_init_clamp_and_bias(tt_params):
  model = _two_towers()
  params = jax.eval_shape(model.init, KEY, _image(), _text())['params']
  assert 'b' not in params
  p = {'params': {k: v for k, v in tt_params['params'].items() if k != 'b'}}
  np.testing.assert_allclose(p['params']['t'], math.log(1 / 0.07), rtol=1e-6)
  _, _, out = model.apply(p, _image(), None)
  np.testing.assert_allclose(out['t'], 1 / 0.07, rtol=1e-5)
  assert 'b' not in out and out['t'].dtype == jnp.float32
  p['params']['t'] = jnp.array(10.0)  # exp(10) >> 100: clamped.
  _, _, out = model.apply(p, _image(), None)
  np.testing.assert_allclose(out['t'], 100.0, rtol=1e-5)
  unclamped = _two_towers(max_temperature=None)
  _, _, out = unclamped.apply(p, _image(), None)
  np.testing.assert_allclose(out['t'], math.exp(10.0), rtol=1e-5)


def test_bf16_params_float32_and_close_to_fp32(tt_params):
  fp32 = _two_towers(bias_init=-10.0)
  bf16 = _two_towers(bias_init=-10.0, dtype='bfloat16')
  p16 = jax.eval_shape(bf16.init, KEY, _image(), _text())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
  assert jax.tree.structure(p16) == jax.tree.structure(
      jax.eval_shape(fp32.init, KEY, _image(), _text()))
  zi16, zt16, out16 = jax.jit(bf16.apply)(tt_params, _image(), _text())
  zi32, zt32, _ = fp32.apply(tt_params, _image(), _text())
  assert zi16.dtype == zt16.dtype == jnp.float32
  assert out16['img/encoded'].dtype == jnp.bfloat16
  np.testing.assert_allclose(zi16, zi32, atol=3e-2)
  np.testing.assert_allclose(zt16, zt32, atol=3e-2)


def test_remat_same_outputs_and_grads(txt_params):
  # The text tower (causal mask passed through the remat'd blocks) only, to
  # keep compile time down; the jaxpr test below covers the image tower.
  def loss(params, model):
    feat, _ = model.apply(params, _text())
    return jnp.sum(jnp.sin(feat)), feat

  results = []
  for remat in (False, True, 'dots', 'dots_no_batch'):
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    results.append(fn(txt_params, _text_model(remat=remat)))
  (v0, feat0), g0 = results[0]
  for (v1, feat1), g1 in results[1:]:
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(feat1, feat0, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
  with pytest.raises(ValueError, match=r"Unknown remat policy 'some'.*dots"):
    _text_model(remat='some').init(KEY, _text())


def test_remat_reaches_both_towers_and_keeps_param_names():
  base = _two_towers(image={'depth': 1}, text={'depth': 1})
  rem = _two_towers(image={'depth': 1}, text={'depth': 1}, remat=True)
  shapes = jax.eval_shape(rem.init, KEY, _image(), _text())
  assert jax.tree.structure(shapes) == jax.tree.structure(
      jax.eval_shape(base.init, KEY, _image(), _text()))
  jaxpr = str(jax.make_jaxpr(rem.apply)(shapes, _image(), _text()))
  assert jaxpr.count('checkpoint') + jaxpr.count('remat') >= 2, jaxpr
  # A tower's 'none' (the configs' string default, so flags can name a policy) defers.
  dots = _two_towers(image={'depth': 1, 'remat': 'none'}, text={'depth': 1}, remat='dots')
  jaxpr = str(jax.make_jaxpr(dots.apply)(shapes, _image(), _text()))
  assert jaxpr.count('policy=DotsSaveable') >= 2, jaxpr  # The policy reaches both towers.
  jaxpr = str(jax.make_jaxpr(base.apply)(shapes, _image(), _text()))
  assert 'checkpoint' not in jaxpr and 'remat' not in jaxpr


def test_scan_matches_unrolled_outputs_and_grads():
  """scan=True is the same function on stacked params; the layouts convert both ways."""
  def grad_fn(model):
    def loss(params):
      zimg, ztxt, _ = model.apply({'params': params}, _image(), _text())
      return jnp.sum(jnp.sin(zimg @ ztxt.T))
    return jax.jit(jax.value_and_grad(loss))

  plain, scanned = _two_towers(), _two_towers(scan=True, remat='dots')
  params = _fake_params(plain, _image(), _text())['params']
  params.update(plain.init(KEY, None, None)['params'])
  stacked = transformer.stack_blocks(params)
  assert jax.tree.structure(stacked) == jax.tree.structure(
      jax.eval_shape(scanned.init, KEY, _image(), _text())['params'])
  blocks = stacked['img']['Transformer']['encoderblock']
  assert blocks['MlpBlock_0']['Dense_0']['kernel'].shape[0] == 2  # pico: depth 2.
  v0, g0 = grad_fn(plain)(params)
  v1, g1 = grad_fn(scanned)(stacked)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               transformer.stack_blocks(g0), g1)
  jax.tree.map(np.testing.assert_array_equal, transformer.unstack_blocks(stacked), params)
  jaxpr = str(jax.make_jaxpr(scanned.apply)({'params': stacked}, _image(), _text()))
  assert jaxpr.count('scan[') >= 2, 'both towers scan'
  with pytest.raises(ValueError, match=r'scan=True needs every layer alike, but MoE layers '
                     r'\[1\] of 2 are sparse; set moe.every=1'):
    _text_model(scan=True, moe=dict(num_experts=2))


def test_sparse_tower_is_the_dense_block_with_a_moe_mlp():
  """One block for both: a sparse tower takes act, ln_eps and scan (all layers sparse) like
  a dense one; scanned and unrolled give the same embeddings and MoE losses."""
  kw = dict(moe=dict(num_experts=2, every=1, group_size=4, importance_weight=1.0),
            act='quick_gelu', ln_eps=1e-5, style='clip')
  plain, scanned = _text_model(**kw), _text_model(scan=True, **kw)
  params = jax.jit(plain.init)(KEY, _text())['params']
  blocks = params['Transformer']
  assert set(blocks['encoderblock_0']) == {'LayerNorm_0', 'LayerNorm_1', 'moe',
                                           'MultiHeadDotProductAttention_0'}
  z0, out0 = jax.jit(plain.apply)({'params': params}, _text())
  z1, out1 = jax.jit(scanned.apply)({'params': transformer.stack_blocks(params)}, _text())
  np.testing.assert_allclose(z1, z0, atol=1e-5)
  np.testing.assert_allclose(out1['aux_loss'], out0['aux_loss'], rtol=1e-5)
  assert sorted(out1['metrics']) == sorted(out0['metrics'])
  assert 'moe/layer1/text/importance_loss' in out0['metrics']
  # The options reach the sparse blocks: another activation or epsilon, other embeddings.
  for other in (dict(kw, act='gelu'), dict(kw, ln_eps=1e-1)):
    z, _ = jax.jit(_text_model(**other).apply)({'params': params}, _text())
    assert not np.allclose(z, z0, atol=1e-4), other


def test_dropout_train_uses_rng(vit_params):
  model = vit.ViT(variant='pico/8', num_classes=EMBED, dropout=0.5,
                  pool='map', class_token=True)
  params = vit_params
  f_eval, _ = model.apply(params, _image())
  f_a, _ = model.apply(params, _image(), train=True,
                       rngs={'dropout': jax.random.PRNGKey(3)})
  assert not np.allclose(f_a, f_eval)


@pytest.mark.parametrize('cfg,match', [
    (dict(image={'variant': 'X/16'}), r"'X/16'.*So400m.*B/16"),
    (dict(image={'variant': 'B/x'}), r"'B/x'.*valid"),
    (dict(text={'variant': 'Q', 'vocab_size': 9}), r"'Q'.*pico.*nano"),
    (dict(image={'variant': 'pico/8', 'pool': 'cls'}), r"'cls'.*gap"),
    (dict(text={'variant': 'pico', 'style': 'gpt'}), r"'gpt'.*siglip"),
    (dict(image={'variant': 'pico/8', 'foo': 1}), r"'foo'.*patch_size"),
    (dict(text={'variant': 'pico', 'num_classes': 3}), r'num_classes'),
    (dict(bogus=1), r"'bogus'.*embed_dim"),
    (dict(name='clip3'), r"'clip3'.*two_towers"),
])
def test_bad_config_raises_at_get_model(cfg, match):
  with pytest.raises(ValueError, match=match):
    _two_towers(**cfg)


def test_decode_variant():
  assert vit.decode_variant('So400m/14') == dict(
      width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14)
  assert text_lib.decode_variant('nano') == dict(
      width=128, depth=4, mlp_dim=512, num_heads=4)
  with pytest.raises(ValueError, match='missing'):
    vit.ViT(variant='B')  # No patch size anywhere.


@pytest.mark.parametrize('dtype,fp32_softmax', [(jnp.float32, False), (jnp.bfloat16, True),
                                                (jnp.bfloat16, False)])
@pytest.mark.parametrize('broadcast_dropout', [True, False])
def test_heads_first_attention_equals_flax(dtype, fp32_softmax, broadcast_dropout):
  """The towers' attention_fn is flax's dot_product_attention in another layout: same
  values with bias, mask and dropout (same random bits), same gradients."""
  import flax.linen as nn
  k = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(k[0], (2, 5, 3, 8), dtype)
  kv = jax.random.normal(k[1], (2, 2, 7, 3, 8), dtype)
  bias = jax.random.normal(k[2], (2, 3, 5, 7), dtype)
  mask = jax.random.bernoulli(k[3], 0.7, (2, 1, 5, 7)).at[..., 0].set(True)
  args = dict(bias=bias, mask=mask, dropout_rng=k[4], dropout_rate=0.3, deterministic=False,
              broadcast_dropout=broadcast_dropout, dtype=dtype,
              force_fp32_for_softmax=fp32_softmax)

  def run(fn):  # Under one jit: eagerly, each of the few hundred ops compiled on its own.
    apply = lambda q, key, value: fn(q, key, value, **args)
    loss = lambda *a: apply(*a).astype(jnp.float32).sum()
    return jax.jit(lambda *a: (apply(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(
        q, kv[0], kv[1])

  (out, grads), (want, want_grads) = run(transformer.heads_first_attention), run(
      nn.dot_product_attention)
  assert out.shape == want.shape == q.shape and out.dtype == want.dtype
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.float32(out), np.float32(want), atol=tol, rtol=tol)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.float32(g), np.float32(w), atol=tol, rtol=tol)
  assert np.abs(np.float32(out)).max() > 0.1  # Not a degenerate all-dropped case.
