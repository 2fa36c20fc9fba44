"""Weights in and out (mmcl.convert): open_clip parity against fixtures, exact round trips,
errors that name the tensors; big_vision SigLIP npz. No torch needed (fixtures are made by
tools/make_convert_fixtures.py)."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl import models
from mmcl.convert import io
from mmcl.convert import open_clip as oc

DATA = os.path.join(os.path.dirname(__file__), 'data')
FIXTURES = ('vit_quickgelu', 'siglip_style')


def _fixture(name):
  path = os.path.join(DATA, f'open_clip_{name}')
  with open(path + '.json') as f:
    cfg = json.load(f)
  return path + '.safetensors', cfg, dict(np.load(path + '_io.npz'))


def _apply(model_cfg, params, image_BxHxWx3, text_BxL):
  model = models.get_model(model_cfg)
  return model.apply({'params': params}, jnp.asarray(image_BxHxWx3), jnp.asarray(text_BxL))


def _unit(x_BxD):
  return x_BxD / np.linalg.norm(x_BxD, axis=-1, keepdims=True)


@pytest.mark.parametrize('name', FIXTURES)
def test_open_clip_parity(name):
  path, cfg, ref = _fixture(name)
  imp = oc.import_open_clip(path, cfg)
  zimg, ztxt, out = _apply(imp.model_config, imp.params, ref['image'].transpose(0, 2, 3, 1),
                           ref['text'])
  np.testing.assert_allclose(out['img/logits'], ref['image_features'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out['txt/logits'], ref['text_features'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(zimg, _unit(ref['image_features']), atol=1e-4, rtol=0)
  np.testing.assert_allclose(ztxt, _unit(ref['text_features']), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out['t'], np.exp(ref['logit_scale']), rtol=1e-6)
  if 'logit_bias' in ref:
    assert float(out['b']) == float(ref['logit_bias'])


def test_config_from_shapes_alone():
  path, cfg, _ = _fixture('vit_quickgelu')
  # quick_gelu is the one thing the tensors cannot tell here (head_width 64 is the default).
  assert oc.import_open_clip(path, quick_gelu=True).model_config == (
      oc.import_open_clip(path, cfg).model_config)
  mc = oc.import_open_clip(path, quick_gelu=True).model_config
  assert (mc['image']['width'], mc['image']['depth'], mc['image']['patch_size']) == (64, 2, 8)
  assert (mc['text']['max_len'], mc['text']['vocab_size'], mc['embed_dim']) == (16, 512, 32)


@pytest.mark.parametrize('name', FIXTURES)
def test_round_trip_through_safetensors_is_exact(name, tmp_path):
  path, cfg, _ = _fixture(name)
  imp = oc.import_open_clip(path, cfg)
  sd, oc_cfg = oc.export_open_clip(imp.model_config, imp.params, str(tmp_path / 'm'))
  # open_clip's own names, all of them (export writes the CLIP class layout: no 'text.').
  assert sorted(sd) == sorted(k.removeprefix('text.') for k in io.load_state_dict(path))
  back = oc.import_open_clip(str(tmp_path / 'm.safetensors'), str(tmp_path / 'm.json'))
  assert back.model_config == imp.model_config and back.open_clip_config == oc_cfg | {
      k: v for k, v in back.open_clip_config.items() if k not in oc_cfg}
  jax.tree.map(np.testing.assert_array_equal, back.params, imp.params)


def test_mmcl_model_round_trip_and_conv_bias_fold(tmp_path):
  cfg = dict(name='two_towers', embed_dim=16, bias_init=-10.0,
             image=dict(variant='pico/8', pool='gap', class_token=True, head_bias=False),
             text=dict(variant='pico', vocab_size=60, max_len=8, style='clip'))
  model = models.get_model(cfg)
  image = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  text = jnp.array([[5, 6, 7, 2, 0, 0, 0, 0], [9, 8, 7, 6, 5, 4, 3, 2]], jnp.int32)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), image, text)['params'])
  with pytest.raises(ValueError, match='eos_id'):  # Pool 'eot' is open_clip 'eos'.
    oc.export_open_clip(cfg, params)
  oc.export_open_clip(cfg, params, str(tmp_path / 'm'), eos_id=2)
  back = oc.import_open_clip(str(tmp_path / 'm.safetensors'), str(tmp_path / 'm.json'))
  # The conv bias (open_clip has none) is folded into the positions: same function.
  want, got = _apply(cfg, params, image, text), _apply(back.model_config, back.params, image, text)
  for w, g in zip(want[:2], got[:2]):
    np.testing.assert_allclose(g, w, atol=1e-6)
  # With a zero conv bias the parameters come back bit for bit.
  params['img']['embedding']['bias'] = np.zeros_like(params['img']['embedding']['bias'])
  oc.export_open_clip(cfg, params, str(tmp_path / 'z'), eos_id=2)
  back = oc.import_open_clip(str(tmp_path / 'z.safetensors'), str(tmp_path / 'z.json'))
  jax.tree.map(np.testing.assert_array_equal, back.params, params)


def test_export_refuses_what_open_clip_cannot_hold():
  cfg = dict(name='two_towers', embed_dim=16, image=dict(variant='pico/8'),
             text=dict(variant='pico', vocab_size=60, max_len=8))
  params = {'img': {'pos_embedding': np.zeros([1, 4, 64])}, 'txt': {}}
  with pytest.raises(ValueError, match='class token'):  # mmcl default: gap, no class token.
    oc.export_open_clip(cfg, params)
  cfg['image'].update(pool='map', class_token=True)
  with pytest.raises(ValueError, match="pool='map'"):
    oc.export_open_clip(cfg, params)


def test_leftover_and_missing_tensors_are_named():
  path, cfg, _ = _fixture('vit_quickgelu')
  sd = io.load_state_dict(path)
  with pytest.raises(ValueError, match=r'not mapped.*visual\.extra_scale'):
    oc.import_open_clip({**sd, 'visual.extra_scale': np.ones(3)}, cfg)
  del sd['visual.transformer.resblocks.1.attn.out_proj.bias']
  with pytest.raises(KeyError, match=r'resblocks\.1\.attn\.out_proj\.bias'):
    oc.import_open_clip(sd, cfg)


def test_config_that_contradicts_the_tensors_is_an_error():
  path, cfg, _ = _fixture('vit_quickgelu')
  cfg['vision_cfg']['width'] = 128
  with pytest.raises(ValueError, match=r'vision_cfg\.width=128.*64'):
    oc.import_open_clip(path, cfg)
  _, cfg, _ = _fixture('vit_quickgelu')
  cfg['vision_cfg']['attentional_pool'] = True
  with pytest.raises(ValueError, match='attentional_pool'):
    oc.import_open_clip(path, cfg)


def test_pt_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  pt = tmp_path / 'model.pt'
  pt.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails.
  with pytest.raises(ImportError, match=r'needs PyTorch.*\.safetensors'):
    oc.import_open_clip(str(pt))
