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
from mmcl import tree
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
  as_jnp = lambda x: None if x is None else jnp.asarray(x)
  return model.apply({'params': params}, as_jnp(image_BxHxWx3), as_jnp(text_BxL))


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
      oc.import_open_clip(path, cfg).model_config) == (  # The hub's open_clip_config.json form.
          oc.import_open_clip(path, {'model_cfg': cfg, 'preprocess_cfg': {}}).model_config)
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


# ----------------------------------------------------------------------- big_vision SigLIP npz


def _big_vision_npz(rng, *, scan=False, d=32, depth=2, heads=2, mlp=64, patch=8, grid=2,
                    vocab=40, length=8, embed=16):
  """Random tensors under big_vision's names (models/vit.py, proj/image_text/*.py)."""
  def block(pre):
    ln = lambda n: {f'{pre}/{n}/scale': [d], f'{pre}/{n}/bias': [d]}
    mlp_ = {f'{pre}/MlpBlock_0/Dense_0/kernel': [d, mlp], f'{pre}/MlpBlock_0/Dense_0/bias': [mlp],
            f'{pre}/MlpBlock_0/Dense_1/kernel': [mlp, d], f'{pre}/MlpBlock_0/Dense_1/bias': [d]}
    att = f'{pre}/MultiHeadDotProductAttention_0'
    att_ = {f'{att}/{n}/kernel': [d, heads, d // heads] for n in ('query', 'key', 'value')}
    att_.update({f'{att}/{n}/bias': [heads, d // heads] for n in ('query', 'key', 'value')})
    att_.update({f'{att}/out/kernel': [heads, d // heads, d], f'{att}/out/bias': [d]})
    return {**ln('LayerNorm_0'), **ln('LayerNorm_1'), **mlp_, **att_}

  def encoder(tower):
    if scan:  # nn.scan stacks the blocks' params on a leading depth axis.
      return {k: [depth] + s for k, s in block(f'{tower}/Transformer/encoderblock').items()}
    out = {}
    for i in range(depth):
      out.update(block(f'{tower}/Transformer/encoderblock_{i}'))
    return out

  shapes = {
      'img/embedding/kernel': [patch, patch, 3, d], 'img/embedding/bias': [d],
      'img/pos_embedding': [1, grid * grid, d], **encoder('img'),
      'img/Transformer/encoder_norm/scale': [d], 'img/Transformer/encoder_norm/bias': [d],
      'img/MAPHead_0/probe': [1, 1, d], 'img/MAPHead_0/LayerNorm_0/scale': [d],
      'img/MAPHead_0/LayerNorm_0/bias': [d],
      **{k.replace('X/', 'img/MAPHead_0/'): s for k, s in block('X').items()
         if 'MlpBlock' in k or 'Multi' in k},
      'img/head/kernel': [d, embed], 'img/head/bias': [embed],
      'txt/Embed_0/embedding': [vocab, d], 'txt/pos_embedding': [1, length, d], **encoder('txt'),
      'txt/Transformer/encoder_norm/scale': [d], 'txt/Transformer/encoder_norm/bias': [d],
      'txt/head/kernel': [d, embed], 'txt/head/bias': [embed], 't': [1], 'b': [1]}
  return {f'params/{k}': (0.2 * rng.standard_normal(s)).astype(np.float32)
          for k, s in shapes.items()}


def test_big_vision_siglip_npz(tmp_path):
  from mmcl.convert import big_vision  # pylint: disable=g-import-not-at-top
  sd = _big_vision_npz(np.random.default_rng(0))
  np.savez(tmp_path / 'siglip.npz', **sd)
  imp = big_vision.import_big_vision(str(tmp_path / 'siglip.npz'))
  mc = imp.model_config
  assert (imp.image_size, imp.context_length, mc['embed_dim']) == (16, 8, 16)
  assert mc['image'] == dict(depth=2, width=32, num_heads=2, mlp_dim=64, patch_size=8, pool='map')
  assert (mc['text']['style'], mc['text']['pool'], mc['text']['vocab_size']) == (
      'siglip', 'last', 40)
  assert mc['text']['pad_as'] == 1  # big_vision's sticky EOS: pads are EOS (1).
  # Complete: every npz tensor is in the params (same values), and nothing else.
  flat = tree.flatten(imp.params)
  assert len(flat) == len(sd)
  np.testing.assert_array_equal(flat['txt/embedding/embedding'], sd['params/txt/Embed_0/embedding'])
  np.testing.assert_array_equal(
      flat['img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel'],
      sd['params/img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel'])
  image = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  text = jnp.array([[3, 4, 1, 1, 1, 1, 1, 1], [5, 6, 7, 8, 9, 10, 11, 1]], jnp.int32)
  zimg, ztxt, out = _apply(mc, imp.params, image, text)
  assert zimg.shape == ztxt.shape == (2, 16) and np.all(np.isfinite(zimg))
  # mmcl's 0-padded ids give big_vision's EOS-padded result.
  ztxt_pad0 = _apply(mc, imp.params, None, jnp.where(text == 1, 0, text))[1]
  np.testing.assert_array_equal(ztxt_pad0, ztxt)
  assert float(out['b']) == float(sd['params/b'][0])
  np.testing.assert_allclose(out['t'], np.exp(sd['params/t'][0]), rtol=1e-6)
  # A scanned checkpoint (stacked blocks) gives the same params.
  scanned = _big_vision_npz(np.random.default_rng(0), scan=True)
  assert sorted(tree.flatten(big_vision.import_big_vision(scanned).params)) == sorted(flat)


def test_big_vision_leftover_tensor_is_named():
  from mmcl.convert import big_vision  # pylint: disable=g-import-not-at-top
  sd = _big_vision_npz(np.random.default_rng(0))
  sd['params/img/pre_logits/kernel'] = np.zeros([32, 32], np.float32)
  with pytest.raises(ValueError, match=r"unexpected \['img/pre_logits/kernel'\]"):
    big_vision.import_big_vision(sd)
  del sd['params/img/pre_logits/kernel'], sd['params/txt/head/bias']
  with pytest.raises(ValueError, match=r"missing \['txt/head/bias'\]"):
    big_vision.import_big_vision(sd)


# ----------------------------------------------------------------------- CLIP BPE tokenizer


def _clip_bpe():
  from mmcl.data import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers.get_tokenizer('clip_bpe:' + os.path.join(DATA, 'clip_bpe_tiny.txt.gz'))


def test_clip_bpe_matches_open_clip_ids():
  ref = np.load(os.path.join(DATA, 'clip_bpe_tiny_ids.npz'))
  tok = _clip_bpe()
  texts = [str(t) for t in ref['texts']]
  np.testing.assert_array_equal(tok.tokenize(texts, ref['ids'].shape[1]), ref['ids'])
  assert tok.eos_id == tok.vocab_size - 1 == ref['ids'].max()  # Argmax pooling finds EOT.
  assert tok.detokenize(tok.tokenize('A photo of the CAT', 12)[0]) == 'a photo of the cat'


def test_clip_bpe_tf_matches_numpy_and_stdlib_regex(monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmcl.data import tokenizers  # pylint: disable=g-import-not-at-top
  tok, text = _clip_bpe(), "it's the photographing dog's 3 cats!"
  np.testing.assert_array_equal(tok.tokenize_tf(tf.constant(text), 10).numpy(),
                                tok.tokenize(text, 10)[0])
  monkeypatch.setitem(sys.modules, 'regex', None)  # The stdlib fallback, on ASCII text.
  plain = tokenizers.ClipBpeTokenizer(os.path.join(DATA, 'clip_bpe_tiny.txt.gz'))
  np.testing.assert_array_equal(plain.tokenize(text, 20), tok.tokenize(text, 20))
  with pytest.raises(FileNotFoundError, match='bpe_simple_vocab'):
    tokenizers.ClipBpeTokenizer('/nonexistent/vocab.txt.gz')


# ----------------------------------------------------------------------- CLI


def test_cli_import_export_and_orbax_params(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tool = os.path.join(os.path.dirname(__file__), '..', 'tools', 'convert.py')
  path, _, _ = _fixture('vit_quickgelu')
  run = lambda *a: subprocess.run([sys.executable, tool, *a], check=True, capture_output=True)
  run('import', '--weights', path, '--quick_gelu', '--out', str(tmp_path / 'm'))
  # An orbax checkpoint step, as training writes it, exports like the .npz.
  ckpt = tmp_path / 'ckpt' / '7'
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(ckpt / 'default', {'params': io.load_params(str(tmp_path / 'm.npz'))})
  checkpointer.wait_until_finished()
  for i, params in enumerate((str(tmp_path / 'm.npz'), str(ckpt))):
    run('export', '--params', params, '--model_json', str(tmp_path / 'm.json'),
        '--out', str(tmp_path / f'oc{i}'))
    got = io.load_state_dict(str(tmp_path / f'oc{i}.safetensors'))
    want = io.load_state_dict(path)
    assert sorted(got) == sorted(want)
    # open_clip's class position is folded into mmcl's class token: same sum, same function.
    ce, pos = 'visual.class_embedding', 'visual.positional_embedding'
    np.testing.assert_array_equal(got[ce] + got[pos][0], want[ce] + want[pos][0])
    np.testing.assert_array_equal(got[pos][1:], want[pos][1:])
    for k in set(want) - {ce, pos}:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_fold_normalization_takes_unit_range_pixels():
  path, cfg, ref = _fixture('vit_quickgelu')
  imp = oc.import_open_clip(path, cfg)
  pixels = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  mean, std = np.array(oc.OPENAI_MEAN, np.float32), np.array(oc.OPENAI_STD, np.float32)
  want = _apply(imp.model_config, imp.params, (pixels - mean) / std, ref['text'][:2])
  folded = oc.fold_normalization(imp.params)
  got = _apply(imp.model_config, folded, pixels, ref['text'][:2])
  np.testing.assert_allclose(got[2]['img/logits'], want[2]['img/logits'], atol=1e-5)
  back = oc.fold_normalization(folded, unfold=True)['img']['embedding']
  np.testing.assert_allclose(back['kernel'], imp.params['img']['embedding']['kernel'], atol=1e-7)
  np.testing.assert_allclose(back['bias'], imp.params['img']['embedding']['bias'], atol=1e-6)


def test_pt_with_torch_loads_weights_only(tmp_path):
  torch = pytest.importorskip('torch')  # Not a dependency: runs where torch happens to be.
  path, cfg, _ = _fixture('siglip_style')
  sd = {k: torch.from_numpy(v) for k, v in io.load_state_dict(path).items()}
  # An open_clip training checkpoint: {'state_dict': ...} saved from DDP ('module.' names).
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in sd.items()}},
             tmp_path / 'ckpt.pt')
  got = oc.import_open_clip(str(tmp_path / 'ckpt.pt'), cfg)
  jax.tree.map(np.testing.assert_array_equal, got.params, oc.import_open_clip(path, cfg).params)


def test_clip_bpe_in_a_pp_string():
  from mmcl.data import preprocess  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = 'clip_bpe:' + os.path.join(DATA, 'clip_bpe_tiny.txt.gz')
  fn = preprocess.get_preprocess_fn(f'tokenize(max_len=8, tokenizer="{spec}", inkey="t", '
                                    'outkey="text")')
  ids = fn({'t': tf.constant('a photo of the cat')})['text'].numpy()
  np.testing.assert_array_equal(ids, _clip_bpe().tokenize('a photo of the cat', 8)[0])


def test_big_vision_import_at_another_resolution_resamples_the_posemb():
  from mmcl.convert import big_vision  # pylint: disable=g-import-not-at-top
  from mmcl.models import posemb  # pylint: disable=g-import-not-at-top
  sd = _big_vision_npz(np.random.default_rng(0))  # 16 px, patch 8: a 2 x 2 grid.
  imp = big_vision.import_big_vision(sd, resize_to=32)
  assert imp.image_size == 32 and imp.params['img']['pos_embedding'].shape == (1, 16, 32)
  np.testing.assert_allclose(imp.params['img']['pos_embedding'], posemb.resample(
      sd['params/img/pos_embedding'], (4, 4)))
  with pytest.raises(ValueError, match='not a multiple of the patch size 8'):
    big_vision.import_big_vision(sd, resize_to=36)


def test_open_clip_import_at_another_resolution():
  path, cfg, _ = _fixture('vit_quickgelu')
  base = oc.import_open_clip(path, cfg)
  size = oc.image_size(base.open_clip_config)
  imp = oc.import_open_clip(path, cfg, resize_to=2 * size, resample='bicubic')
  assert oc.image_size(imp.open_clip_config) == 2 * size
  n = base.params['img']['pos_embedding'].shape[1]
  assert imp.params['img']['pos_embedding'].shape[1] == 4 * n
  # The class token's position is folded into 'cls' on import: not resampled, unchanged.
  np.testing.assert_array_equal(imp.params['img']['cls'], base.params['img']['cls'])
