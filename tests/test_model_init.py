"""Starting runs from existing weights: config.model_init (mmcl.train.model_init)."""
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from mmcl import tree
from mmcl.models import transformer
from mmcl.train import loop
from mmcl.train import model_init


def tiny_config(data_dir, **overrides):
  c = demo.get_config('tiny')
  c.data_dir, c.progress_bar = data_dir, False
  c.evals = ml_collections.ConfigDict()  # Only the parameters matter here.
  c.update_from_flattened_dict(overrides)
  return c


def _tree(rng, depth=2):
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  block = lambda: {'MlpBlock_0': {'Dense_0': {'kernel': normal(3, 5)}}}
  return {'img': {'head': {'kernel': normal(5, 4)},
                  'Transformer': {f'encoderblock_{i}': block() for i in range(depth)}},
          't': normal()}


def test_merge_loads_everything_but_dont_load_and_converts_the_scan_layout():
  rng = np.random.default_rng(0)
  fresh, loaded = _tree(rng), _tree(rng)
  out = model_init.merge(fresh, loaded, dont_load=['img/head/.*'])
  flat, want, init = tree.flatten(out), tree.flatten(loaded), tree.flatten(fresh)
  for name in flat:
    np.testing.assert_array_equal(flat[name], init[name] if 'head' in name else want[name])
  # A scanned model takes per-layer weights (e.g. a converted checkpoint), stacked.
  scanned = model_init.merge(transformer.stack_blocks(fresh), loaded)
  np.testing.assert_array_equal(
      scanned['img']['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']['kernel'][1],
      loaded['img']['Transformer']['encoderblock_1']['MlpBlock_0']['Dense_0']['kernel'])


def test_merge_names_what_does_not_fit():
  rng = np.random.default_rng(0)
  fresh, loaded = _tree(rng), _tree(rng, depth=1)
  loaded['img']['head']['kernel'] = np.zeros((5, 8))
  with pytest.raises(ValueError, match=r"missing \[img/Transformer/encoderblock_1/.*kernel\]"
                     r".*img/head/kernel: \(5, 8\) vs model \(5, 4\).*model_init_dont_load"):
    model_init.merge(fresh, loaded)
  del fresh['img']['Transformer']['encoderblock_1']
  model_init.merge(fresh, loaded, dont_load=['img/head/kernel'])  # Now it fits.


def test_lit_run_starts_from_a_checkpoint_with_the_image_tower_frozen(shapes_data_dir,
                                                                       tmp_path):
  first = tiny_config(shapes_data_dir, total_steps=2, ckpt_every=2)
  loop.run(first, str(tmp_path / 'a'))
  # Another layout (scanned blocks) and another sharding (FSDP) than the checkpoint's.
  lit = tiny_config(shapes_data_dir, total_steps=2, ckpt_every=2,
                    model_init=str(tmp_path / 'a' / 'ckpt' / '2'), **{'optim.freeze': 'img/.*'})
  lit.model.scan = True
  lit.mesh = (('data', 4), ('fsdp', 2))
  loop.run(lit, str(tmp_path / 'b'))
  restore = lambda w: ocp.StandardCheckpointer().restore(
      str(tmp_path / w / 'ckpt' / '2' / 'default'))['params']
  a, b = restore('a'), transformer.unstack_blocks(restore('b'))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a['img'], b['img'])  # Loaded, then frozen.
  changed = jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y),
                                         a['txt'], b['txt']))
  assert all(changed), 'the text tower trains on from the loaded weights'


def test_missing_model_init_fails_before_compiling(shapes_data_dir, tmp_path):
  c = tiny_config(shapes_data_dir, model_init=str(tmp_path / 'nope.npz'))
  with pytest.raises(ValueError, match=r"model_init=.*nope.npz' does not exist.*tools/convert"):
    loop.run(c, str(tmp_path))
