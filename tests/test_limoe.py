"""LIMoE model: interface like TwoTowers, modality separation, aux losses, training."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import limoe_demo
from mmcl import models, tree
from mmcl.models import moe
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib

B, IMG, VOCAB, EMBED = 4, 16, 50, 16
# Groups of 4 tokens: an image (2x2 patches) and half a text, so routing groups never
# cross devices on any mesh used here and sharded == unsharded.
MOE = dict(num_experts=4, every=1, group_size=4, local_entropy_weight=0.1,
           global_entropy_weight=0.1, importance_weight=0.1)


def _model(**kw):
  cfg = dict(name='limoe', variant='pico/8', moe=MOE, embed_dim=EMBED, vocab_size=VOCAB,
             max_len=16, temperature_init=10.0)
  cfg.update(kw)
  return models.get_model(cfg)


def _inputs():
  image = jax.random.normal(jax.random.key(1), (B, IMG, IMG, 3))
  text = jax.random.randint(jax.random.key(2), (B, 8), 1, VOCAB)
  return image, text


@pytest.fixture(scope='module')
def setup():
  model = _model()
  image, text = _inputs()
  # Random params of init's shapes, drawn in numpy: a real init compiles every initialiser.
  rng = np.random.default_rng(0)
  def make(leaf):
    x = rng.standard_normal(leaf.shape)
    return jnp.asarray(x / np.sqrt(np.prod(leaf.shape[-2:-1])) if leaf.ndim >= 2 else
                       1.0 + 0.1 * x, leaf.dtype)
  shapes = jax.eval_shape(model.init, jax.random.key(0), image, text)
  params = jax.tree.map(make, shapes)
  params['params']['t'] = jnp.log(10.0)
  return model, params, image, text


_JITTED = {}


def _apply(model, params, image, text):
  # Jitted once per model (op-by-op dispatch of the routing code is slow on a shared CPU);
  # tests with the same shapes share the compiled function.
  if id(model) not in _JITTED:  # Modules holding dicts are not hashable.
    _JITTED[id(model)] = jax.jit(model.apply)
  return _JITTED[id(model)](params, image, text)


def test_outputs_like_two_towers(setup):
  model, params, image, text = setup
  zimg, ztxt, out = _apply(model, params, image, text)
  assert zimg.shape == ztxt.shape == (B, EMBED)
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out['t'], 10.0, rtol=1e-6)
  assert 'b' not in out
  # One encoder shared by both modalities; per-modality embeddings and heads.
  p = params['params']
  assert {'Transformer', 'img_embedding', 'txt_embedding', 'img_head', 'txt_head'} <= set(p)
  assert p['Transformer']['encoderblock_0']['moe']['wi'].shape[0] == 4
  # Evaluation embeds one modality at a time; the other output is None.
  zimg1, none, out1 = _apply(model, params, image, None)
  assert none is None
  np.testing.assert_allclose(zimg1, zimg, atol=1e-6)
  assert all('/image/' in k for k in out1['metrics'])
  none, ztxt1, _ = _apply(model, params, None, text)
  assert none is None
  np.testing.assert_allclose(ztxt1, ztxt, atol=1e-6)


def test_modalities_do_not_attend_to_each_other(setup):
  model, params, image, text = setup
  zimg, _, _ = _apply(model, params, image, text)
  zimg2, _, _ = _apply(model, params, image, text[:, ::-1])  # Other texts, same images.
  np.testing.assert_allclose(zimg2, zimg, atol=1e-6)


def test_aux_loss_sums_weighted_losses_of_both_modalities(setup):
  model, params, image, text = setup
  _, _, out = _apply(model, params, image, text)
  m = out['metrics']
  want = 0.0
  for layer in (0, 1):
    for mod in ('image', 'text'):
      pre = f'moe/layer{layer}/{mod}/'
      want += 0.1 * (m[pre + 'local_entropy_loss'] + m[pre + 'global_entropy_loss']
                     + m[pre + 'importance_loss'])
      np.testing.assert_allclose(sum(m[f'{pre}expert{e}'] for e in range(4)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out['aux_loss'], want, rtol=1e-5)
  assert float(out['aux_loss']) > 0
  # Aux losses carry gradient to the shared router.
  g = jax.jit(jax.grad(lambda p: model.apply({'params': p}, image, text)[2]['aux_loss']))(
      params['params'])
  assert float(jnp.abs(g['Transformer']['encoderblock_0']['moe']['router']).max()) > 0


def test_bad_configs_fail_at_construction():
  with pytest.raises(ValueError, match=r"Unknown MoE field\(s\) \['experts'\]"):
    _model(moe=dict(experts=4))
  with pytest.raises(ValueError, match=r'k=3 must be in \[1, num_experts=2\]'):
    _model(moe=dict(num_experts=2, k=3))
  with pytest.raises(ValueError, match=r'MoE layers \[5\] out of range for depth 2'):
    _model(moe=dict(layers=[5]))
  with pytest.raises(ValueError, match=r"image_pool 'tok'.*valid"):
    _model(image_pool='tok')


def test_sharded_limoe_matches_unsharded(setup):
  model, params, image, text = setup
  want = _apply(model, params, image, text)
  mesh = jax.make_mesh((2, 2), ('data', 'expert'), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  got = jax.jit(model.clone(mesh=mesh).apply)(params, image, text)
  np.testing.assert_allclose(got[0], want[0], atol=2e-6)
  np.testing.assert_allclose(got[1], want[1], atol=2e-6)
  np.testing.assert_allclose(got[2]['aux_loss'], want[2]['aux_loss'], rtol=1e-5)


@pytest.mark.slow
def test_limoe_demo_trains_and_logs_utilisation(shapes_data_dir, tmp_path):
  c = limoe_demo.get_config('tiny')
  c.data_dir = shapes_data_dir
  c.progress_bar = False
  c.total_steps, c.log_every, c.ckpt_every = 40, 1, 1000
  c.evals = {}
  loop.run(c, str(tmp_path))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if 'train/loss' in r]
  losses = [r['train/loss'] for r in rows]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
  last = rows[-1]
  layers = moe.MoeSpec.make(c.model.moe.to_dict()).layer_ids(c.model.depth)
  for mod in ('image', 'text'):
    use = [last[f'train/moe/layer{layers[0]}/{mod}/expert{e}'] for e in range(4)]
    np.testing.assert_allclose(sum(use), 1.0, rtol=1e-5)
    assert 0 <= last[f'train/moe/layer{layers[0]}/{mod}/dropped'] <= 1
  assert last['train/total_loss'] > last['train/loss']  # The aux losses were added.


def test_paper_configs_build_and_summarize():
  from configs import limoe_b16, limoe_h14
  for cfg in (limoe_b16.get_config(), limoe_h14.get_config()):
    spec = moe.MoeSpec.make(cfg.model.moe.to_dict())
    assert (spec.num_experts, spec.k, spec.bpr, cfg.model.temperature_init) == (32, 1, True, 10.0)
    assert spec.layer_ids(models.get_model(cfg.model).hparams()['depth'])[:2] == (1, 3)
  assert (limoe_b16.get_config().batch_size, limoe_b16.get_config().total_steps) == (8192, 100_000)
  assert (limoe_h14.get_config().batch_size, limoe_h14.get_config().total_steps) == (16_384, 781_250)
  # Shapes only: total and active parameter counts and FLOPs of a tiny LIMoE.
  c = limoe_b16.get_config('tiny')
  s = models.summarize(c.model, c.image_size, c.text_len, batch=2)
  e = 4
  expert = sum(math.prod(shape) for shape in (
      (64, 256), (256,), (256, 64), (64,)))  # pico MLP: 64 -> 256 -> 64.
  n_moe = len(moe.MoeSpec.make(c.model.moe.to_dict()).layer_ids(2))
  assert s['total_params'] - s['active_params'] == n_moe * (e - 1) * expert
  assert s['forward_flops'] > 0


def test_utilisation_parsing_and_plot(tmp_path):
  import importlib.util
  import json
  import os
  rows = [{'step': 10, 'train/loss': 1.0, 'train/moe/layer1/image/expert0': 0.75,
           'train/moe/layer1/image/expert1': 0.25, 'train/moe/layer1/text/expert1': 1.0,
           'train/moe/layer1/text/expert0': 0.0, 'train/moe/layer1/text/dropped': 0.1}]
  assert moe.utilisation(rows[0]) == {'image': {1: [0.75, 0.25]}, 'text': {1: [0.0, 1.0]}}
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  spec = importlib.util.spec_from_file_location(
      'plot_experts', os.path.join(os.path.dirname(__file__), '..', 'tools', 'plot_experts.py'))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  out = tool.plot_utilisation(str(tmp_path), str(tmp_path / 'u.png'))
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='No MoE utilisation metrics'):
    tool.plot_utilisation(str(tmp_path), str(tmp_path / 'v.png'), step=3)


@pytest.mark.slow
def test_setup_step_is_expert_parallel_and_matches_plain_routing():
  """The loop's step from `setup`: expert dispatch by all-to-all over the mesh it is given
  (with or without an ambient `jax.set_mesh`: the same program), equal to plain routing."""
  from configs import limoe_b16
  from mmcl import losses
  from mmcl.parallel import mesh as mesh_lib
  c = limoe_b16.get_config('tiny')
  c.mesh = (('data', 4), ('expert', 2))
  c.model.moe.group_size = 64  # Divides each device's image (4 x 64) and text (4 x 16) tokens.
  s = loop.setup(c)
  mesh, model, shapes, state_sharding = s.mesh, s.model, s.batch_shapes, s.state_sharding
  loss_fn = losses.make_loss_fn(c.loss.name, c.loss.impl, mesh)
  by_path = {tree.path_str(p): sh.spec
             for p, sh in jax.tree_util.tree_leaves_with_path(state_sharding)}
  assert tuple(by_path['params/Transformer/encoderblock_1/moe/wi']) == ('expert', None, None)
  batch = {'image': jax.random.normal(jax.random.key(1), shapes['image'].shape),
           'text': jax.random.randint(jax.random.key(2), shapes['text'].shape, 1, 258)}
  batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
  state = s.init_state(jax.random.key(c.seed))
  lowered = s.train_step.lower(state, batch)
  with jax.set_mesh(mesh):  # Lowered alike: the program's collectives are the model's own.
    ambient = s.train_step.lower(state, batch).as_text()
  collectives = lambda text: {op: text.count(op) for op in (  # pylint: disable=g-long-lambda
      'all_to_all', 'all_reduce', 'all_gather', 'collective_permute')}
  assert collectives(ambient) == collectives(lowered.as_text())
  assert collectives(ambient)['all_to_all'] > 0
  compiled = lowered.compile()
  assert 'all-to-all' in compiled.as_text()
  # The same forward pass (same gating-noise key) without the mesh: plain routing code.
  zimg, ztxt, out = jax.jit(lambda p, b: model.clone(mesh=None).apply(
      {'params': p}, b['image'], b['text'], train=True,
      rngs={'dropout': jax.random.fold_in(jax.random.key(c.seed), 0)}))(state['params'], batch)
  loss, _ = loss_fn(zimg, ztxt, out['t'], out.get('b'))
  got = jax.device_get(compiled(state, batch)[1])  # Donates `state`: last.
  np.testing.assert_allclose(got['train/loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(got['train/total_loss'], loss + out['aux_loss'], rtol=1e-5)
  for name in ('moe/layer1/image/dropped', 'moe/layer1/text/expert0',
               'moe/layer1/image/local_entropy_loss'):
    np.testing.assert_allclose(got[f'train/{name}'], out['metrics'][name], rtol=1e-5)


def test_sparse_towers_in_two_towers_report_aux_losses():
  cfg = dict(name='two_towers', embed_dim=EMBED,
             image=dict(variant='pico/8', moe=dict(num_experts=4, importance_weight=1.0)),
             text=dict(variant='pico', vocab_size=VOCAB, max_len=16,
                       moe=dict(num_experts=2, layers=[0], local_entropy_weight=1.0)))
  model = models.get_model(cfg)
  image, text = _inputs()
  params = jax.jit(model.init)(jax.random.key(0), image, text)
  zimg, ztxt, out = _apply(model, params, image, text)
  assert zimg.shape == ztxt.shape == (B, EMBED)
  assert 'moe/encoderblock_1' not in params['params']['img']['Transformer']['encoderblock_0']
  assert 'moe' in params['params']['img']['Transformer']['encoderblock_1']
  assert 'moe' in params['params']['txt']['Transformer']['encoderblock_0']
  m = out['metrics']
  np.testing.assert_allclose(
      out['aux_loss'], m['moe/layer1/image/importance_loss'] + m['moe/layer0/text/local_entropy_loss'],
      rtol=1e-6)
  assert not any(k.startswith(('img/moe', 'txt/moe', 'img/aux', 'txt/aux')) for k in out)


@pytest.mark.parametrize('tower', ['limoe', 'two_towers'])
def test_route_padding_false_leaves_text_after_eot_unrouted(tower):
  """Causal text pooled at EOT: padding cannot reach the embedding, so without drops
  (capacity = group) routing it or not gives the same ztxt, while the text statistics count
  only the tokens up to EOT."""
  moe_cfg = dict(num_experts=4, layers=[0, 1], group_size=4, capacity_factor=4.0)

  def build(route_padding, style='clip'):
    spec = dict(moe_cfg, route_padding=route_padding)
    if tower == 'limoe':
      return _model(moe=spec, text_style=style)
    return models.get_model(dict(name='two_towers', embed_dim=EMBED, image=dict(variant='pico/8'),
                                 text=dict(variant='pico', vocab_size=VOCAB, max_len=16,
                                           style=style, moe=spec)))

  image, text = _inputs()
  text = jnp.where(jnp.arange(8)[None] < jnp.asarray([[2], [8], [3], [5]]), text, 0)
  routed, unrouted = build(True), build(False)
  params = jax.jit(routed.init)(jax.random.key(0), image, text)
  _, z_all, out_all = jax.jit(routed.apply)(params, image, text)
  _, z_eot, out_eot = jax.jit(unrouted.apply)(params, image, text)
  np.testing.assert_allclose(z_eot, z_all, rtol=1e-5, atol=1e-6)
  fractions = lambda out: np.array([out['metrics'][f'moe/layer0/text/expert{e}'] for e in range(4)])
  np.testing.assert_allclose(fractions(out_eot).sum(), 1.0, rtol=1e-6)
  assert np.abs(fractions(out_eot) - fractions(out_all)).max() > 1e-3  # Pads no longer counted.
  with pytest.raises(ValueError, match=r'route_padding=False needs causal text pooled at EOT'):
    build(False, style='siglip')
