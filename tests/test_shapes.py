"""Tests for the synthetic `mmcl_shapes` generator and its TFDS builder."""
import collections
import itertools
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mmcl.data import shapes
from mmcl.data.shapes import builder
from mmcl.data.shapes import generator

HELDOUT_IDS = {generator.combo_index(shapes.COLORS.index(c),
                                     shapes.SHAPES.index(s))
               for c, s in shapes.HELDOUT_COMBOS}


def _examples(split, n, size=64, seed=0):
  return [shapes.make_example(generator.example_rng(seed, split, i), size,
                              split) for i in range(n)]


@pytest.fixture(scope='module')
def train_examples():
  return _examples('train', 1000)


@pytest.fixture(scope='module')
def test_examples():
  return _examples('test', 500)


def _words(text):
  return set(re.findall(r'[a-z]+', text))


def _color_pixels(image, color):
  """Number of pixels within a small tolerance of a class colour."""
  rgb = generator.COLOR_RGB[color]
  return int((np.abs(image.astype(np.float32) - rgb).max(-1) < 30).sum())


def test_vocabularies():
  assert len(shapes.SHAPES) >= 8 and len(set(shapes.SHAPES)) == len(
      shapes.SHAPES)
  assert len(shapes.COLORS) == 8 and len(set(shapes.COLORS)) == 8
  assert shapes.SIZES == ('small', 'large')
  assert len(shapes.COMBO_NAMES) == len(shapes.COLORS) * len(shapes.SHAPES)
  assert shapes.COMBO_NAMES[generator.combo_index(2, 3)] == (
      f'{shapes.COLORS[2]} {shapes.SHAPES[3]}')
  # Colours far apart from each other and from the (grey, <= ~130) background.
  rgb = generator.COLOR_RGB
  dists = np.abs(rgb[:, None] - rgb[None]).max(-1)
  assert dists[~np.eye(len(rgb), dtype=bool)].min() >= 80
  assert (rgb.max(-1) - rgb.min(-1) >= 150).sum() == 7  # All but white.
  assert rgb[shapes.COLORS.index('white')].min() > 200


def test_heldout_combos_are_a_permutation():
  colors = [c for c, _ in shapes.HELDOUT_COMBOS]
  kinds = [s for _, s in shapes.HELDOUT_COMBOS]
  assert len(shapes.HELDOUT_COMBOS) == 8
  assert len(set(colors)) == 8 and set(colors) <= set(shapes.COLORS)
  assert len(set(kinds)) == 8 and set(kinds) <= set(shapes.SHAPES)


def test_deterministic_and_order_independent():
  a = shapes.make_example(generator.example_rng(0, 'train', 7), 64, 'train')
  _examples('train', 3)  # Unrelated draws in between must not matter.
  b = shapes.make_example(generator.example_rng(0, 'train', 7), 64, 'train')
  assert a['image'].tobytes() == b['image'].tobytes()
  assert a['captions'] == b['captions']
  c = shapes.make_example(generator.example_rng(0, 'train', 8), 64, 'train')
  d = shapes.make_example(generator.example_rng(1, 'train', 7), 64, 'train')
  e = shapes.make_example(generator.example_rng(0, 'test', 7), 64, 'test')
  for other in (c, d, e):
    assert a['image'].tobytes() != other['image'].tobytes()


@pytest.mark.parametrize('size', [32, 64])
def test_image_format_and_content(size):
  for ex in _examples('validation', 40, size=size):
    image = ex['image']
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    # Object 0 is really drawn in its colour; the background is not.
    assert _color_pixels(image, ex['color']) >= 4
    assert image.std() > 5  # Textured, not flat.


def test_sizes_are_clearly_different(train_examples):
  pixels = collections.defaultdict(list)
  for ex in train_examples:
    if ex['num_objects'] == 1:
      pixels[ex['size']].append(_color_pixels(ex['image'], ex['color']))
  assert np.mean(pixels[1]) > 2.5 * np.mean(pixels[0])


def test_train_never_contains_heldout(train_examples):
  seen = collections.Counter()
  for ex in train_examples:
    for obj in ex['objects']:
      combo = generator.combo_index(obj['color'], obj['shape'])
      assert combo not in HELDOUT_IDS, ex['captions'][0]
      seen[combo] += 1
  assert len(seen) == len(shapes.COMBO_NAMES) - len(HELDOUT_IDS)


def test_heldout_in_test(test_examples):
  single = [ex for ex in test_examples if ex['num_objects'] == 1]
  heldout = [ex['combo'] for ex in single if ex['combo'] in HELDOUT_IDS]
  assert set(heldout) == HELDOUT_IDS
  # ~25% forced plus the share drawn by chance among all 64 pairs.
  assert 0.2 < len(heldout) / len(single) < 0.5


def test_labels_consistent(train_examples, test_examples):
  num_two = 0
  for ex in train_examples + test_examples:
    objects = ex['objects']
    first = objects[0]
    assert ex['num_objects'] == len(objects) in (1, 2)
    assert (ex['shape'], ex['color'], ex['size']) == (
        first['shape'], first['color'], first['size'])
    assert ex['combo'] == ex['color'] * len(shapes.SHAPES) + ex['shape']
    assert shapes.COMBO_NAMES[ex['combo']] == (
        f"{shapes.COLORS[ex['color']]} {shapes.SHAPES[ex['shape']]}")
    for obj in objects:  # Fully inside the image.
      r = obj['diameter'] / 2
      assert all(r <= c <= 64 - r for c in obj['center'])
    if len(objects) == 2:
      num_two += 1
      a, b = objects
      assert (a['color'], a['shape']) != (b['color'], b['shape'])
      assert a['position'] != b['position']
      gap = np.hypot(*np.subtract(a['center'], b['center']))
      assert gap >= (a['diameter'] + b['diameter']) / 2  # No overlap.
  assert 0.15 < num_two / (len(train_examples) + len(test_examples)) < 0.45


def test_captions_describe_objects(train_examples):
  for ex in train_examples:
    caps = ex['captions']
    assert len(set(caps)) == len(caps) >= 5
    assert all(0 < len(c) < 80 for c in caps)
    words = [_words(c) for c in caps]
    mentioned = [(shapes.COLORS[o['color']], shapes.SHAPES[o['shape']])
                 for o in ex['objects']]
    allowed = set(itertools.chain(*mentioned))
    for w in words:  # Never a colour or shape that is not in the image.
      assert w & (set(shapes.COLORS) | set(shapes.SHAPES)) <= allowed
    color, kind = mentioned[0]
    assert sum(f'{color} {kind}' in c for c in caps) >= 3
    assert any(shapes.SIZES[ex['size']] in w for w in words)
    if ex['num_objects'] == 1:
      assert all(color in w or kind in w for w in words)
    else:  # Every caption mentions both objects (by colour or shape).
      for c2, k2 in mentioned:
        assert all(c2 in w or k2 in w for w in words)


def test_captions_fit_context_in_worst_case():
  longest = max(generator.POSITION_NAMES, key=len)
  def obj(combo, size=1, position=longest):
    return dict(color=combo // len(shapes.SHAPES),
                shape=combo % len(shapes.SHAPES), size=size,
                position=position)
  n = len(shapes.COMBO_NAMES)
  for a, b in itertools.permutations(range(n), 2):
    others = [p for p in generator.POSITION_NAMES if p != longest]
    second = max(others, key=len)
    for caption in generator.captions([obj(a), obj(b, position=second)]):
      assert len(caption) <= generator.MAX_CAPTION_CHARS, caption
  for pa, pb in itertools.permutations(generator.POSITION_NAMES, 2):
    for combo in range(n):
      objects = [obj(combo, position=pa), obj((combo + 1) % n, position=pb)]
      for caption in generator.captions(objects):
        assert len(caption) <= generator.MAX_CAPTION_CHARS, caption


def test_class_names_and_prompts():
  assert shapes.CLASS_NAMES == {'shape': shapes.SHAPES,
                                'color': shapes.COLORS,
                                'combo': shapes.COMBO_NAMES}
  for task, templates in shapes.PROMPTS.items():
    assert task in shapes.CLASS_NAMES and templates
    for template in templates:
      assert template.count('{}') == 1
      longest = max(shapes.CLASS_NAMES[task], key=len)
      assert len(template.format(longest)) < 80


def test_split_validation():
  with pytest.raises(ValueError):
    shapes.make_example(np.random.default_rng(0), 64, 'bogus')


def test_encode_png_roundtrip():
  image = shapes.make_example(np.random.default_rng(3), 48, 'test')['image']
  decoded = tf.io.decode_png(builder.encode_png(image), channels=3).numpy()
  np.testing.assert_array_equal(decoded, image)


def test_builder_configs():
  configs = shapes.MmclShapes.BUILDER_CONFIGS
  assert [c.name for c in configs] == ['default', 'px32', 'tiny']
  assert [c.image_size for c in configs] == [64, 32, 64]
  assert (configs[0].num_train, configs[0].num_validation,
          configs[0].num_test) == (20000, 1000, 2000)
  assert (configs[2].num_train, configs[2].num_validation,
          configs[2].num_test) == (512, 128, 128)


def test_builder_tiny(shapes_data_dir):
  info = tfds.builder('mmcl_shapes/tiny', data_dir=shapes_data_dir).info
  assert {k: v.num_examples for k, v in info.splits.items()} == {
      'train': 512, 'validation': 128, 'test': 128}
  assert set(info.features) == {'image', 'captions', 'shape', 'color',
                                'combo', 'size', 'num_objects', 'objects'}
  assert info.features['combo'].names == list(shapes.COMBO_NAMES)
  assert info.features['size'].names == list(shapes.SIZES)

  ds = tfds.load('mmcl_shapes/tiny', split='test', data_dir=shapes_data_dir,
                 download=False)
  rows = list(ds.as_numpy_iterator())
  assert len(rows) == 128
  # The stored examples are exactly the generator's, image bytes included.
  generated = _examples('test', 128)
  assert sorted(r['combo'] for r in rows) == sorted(
      ex['combo'] for ex in generated)
  by_captions = collections.defaultdict(list)
  for ex in generated:
    by_captions[tuple(ex['captions'])].append(ex)
  for row in rows:
    assert row['image'].dtype == np.uint8 and row['image'].shape == (64, 64, 3)
    candidates = by_captions[tuple(c.decode() for c in row['captions'])]
    matches = [ex for ex in candidates
               if np.array_equal(ex['image'], row['image'])]
    assert len(matches) == 1
    for key in ('shape', 'color', 'combo', 'size', 'num_objects'):
      assert row[key] == matches[0][key], key
    np.testing.assert_allclose(row['objects']['bbox'],
                               [o['box'] for o in matches[0]['objects']], atol=1e-6)
    assert [c.decode() for c in row['objects']['caption']] == [
        o['region_caption'] for o in matches[0]['objects']]
  assert {r['combo'] for r in rows} & HELDOUT_IDS


def test_prepare_is_idempotent(shapes_data_dir):
  again = shapes.prepare(shapes_data_dir, 'tiny')
  assert again.info.splits['train'].num_examples == 512
  assert again.data_path.name == '1.1.0'
