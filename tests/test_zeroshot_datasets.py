"""Zero-shot and retrieval over mocked TFDS datasets (imagenet2012 and variants, coco_captions).

`tfds.testing.mock_data` serves hand-made examples: every image is one flat colour whose
first two channels spell an image id, so a stub image tower can read the id back after
resize_small/central_crop/value_range and embed whatever the test wants. The stub text
tower maps each expected text (found by an integer fingerprint of its tokens) to a vector.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mmcl import evaluate
from mmcl.data import tokenizers
from mmcl.evaluate import predict, prompts, retrieval, zeroshot
from mmcl.parallel import mesh as mesh_lib
from test_evaluate import StubModel

PP = 'decode|resize_small(24)|central_crop(24)|value_range(-1, 1)'
TEXT_LEN = 48
NUM = 1000
# CLIP's list names two pairs alike ('missile', 'sunglasses'): identical classifiers, so ties.
DUPLICATE = (657, 744, 836, 837)


@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.create_mesh([('data', -1)])


def coloured_image(i, rng):
  h, w = rng.choice([(30, 44), (44, 30), (24, 24)])  # Both orientations: resize_small.
  return np.broadcast_to(np.array([i % 256, i // 256, 9], np.uint8), (h, w, 3)).copy()


def image_tower(targets):
  """Reads the id of a flat-coloured image and returns targets[id]."""
  targets = jnp.asarray(targets, jnp.float32)

  def fn(images):
    rgb = jnp.round((images[:, 12, 12, :2] + 1.0) * 127.5).astype(jnp.int32)
    return targets[rgb[:, 0] + 256 * rgb[:, 1]]

  return fn


def text_tower(texts, targets):
  """Maps the token row of texts[i] to targets[i]; other texts map to 0."""
  tok = tokenizers.get_tokenizer('bytes')
  rows = tok.tokenize(list(texts), TEXT_LEN).astype(np.int64)
  # Small weights keep the fingerprint exact in int32 (jax without x64): 48 * 258 * 2^17 < 2^31.
  w = np.random.default_rng(0).integers(1, 2**17, size=TEXT_LEN)
  fps, inverse = np.unique(rows @ w, return_inverse=True)
  table = np.zeros((len(fps), targets.shape[1]))
  np.add.at(table, inverse, targets)  # Identical texts share (sum) their targets.
  fps_j, table_j, w_j = jnp.asarray(fps), jnp.asarray(table, jnp.float32), jnp.asarray(w)

  def fn(tokens):
    fp = tokens.astype(jnp.int32) @ w_j.astype(jnp.int32)
    return (fp[:, None] == fps_j[None, :]).astype(jnp.float32) @ table_j

  return fn


def mock(examples, splits_seen=None):
  """mock_data serving `examples` (a list of feature dicts) for any split."""
  def spec(v):
    v = np.asarray(v)
    return tf.TensorSpec([None] * v.ndim, tf.as_dtype(v.dtype))

  def as_dataset(self, split, *args, **kwargs):
    del args, kwargs
    if splits_seen is not None:
      splits_seen.append((self.name, str(split)))
    sig = {k: ({kk: spec(vv) for kk, vv in v.items()} if isinstance(v, dict) else spec(v))
           for k, v in examples[0].items()}
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=sig)

  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def imagenet_classifier_texts(prompt_set='clip7'):
  names, temps = prompts.classnames('imagenet', None, 'label'), prompts.templates(prompt_set)
  texts = [t.format(c) for c in names for t in temps]
  return texts, np.repeat(np.eye(NUM), len(temps), axis=0)


def evaluator(mesh, targets, datasets, prompt_set='classname', **kw):
  """Class-name prompts keep most tests fast; one test runs CLIP's 7 templates. With
  prompt_set=None each dataset keeps its protocol's prompts (and the text tower is unused)."""
  texts, text_targets = imagenet_classifier_texts(prompt_set or 'classname')
  model = StubModel(image_fn=image_tower(targets), text_fn=text_tower(texts, text_targets))
  return zeroshot.ZeroShotEvaluator(predict.Predictor(model, mesh), tokenizer='bytes',
                                    text_len=TEXT_LEN, pp_img=PP, datasets=datasets,
                                    prompts=prompt_set, batch_size=16, **kw)


def test_packaged_class_names_and_prompts():
  names = prompts.classnames('imagenet', None, 'label')
  assert len(names) == NUM and names[:3] == ('tench', 'goldfish', 'great white shark')
  assert names[-1] == 'toilet paper' and names[21] == 'kite (bird of prey)'
  dup = {n for n in names if names.count(n) > 1}
  assert dup == {'missile', 'sunglasses'}
  assert [i for i, n in enumerate(names) if n in dup] == list(DUPLICATE)
  p80, p7 = prompts.templates('clip80'), prompts.templates('clip7')
  assert len(set(p80)) == 80 and len(set(p7)) == 7 and set(p7) < set(p80)
  assert 'itap of a {}.' in p7 and 'a photo of a {}.' in p80
  for subset in ('imagenet_a', 'imagenet_r'):
    idx = prompts.class_subset(subset)
    assert len(set(idx)) == 200 and list(idx) == sorted(idx) and max(idx) < NUM
  a, r = set(prompts.class_subset('imagenet_a')), set(prompts.class_subset('imagenet_r'))
  assert 0 < len(a & r) < 200  # Different subsets that overlap.
  assert names[prompts.class_subset('imagenet_a')[0]] == 'stingray'  # n01498041.
  assert names[prompts.class_subset('imagenet_r')[0]] == 'goldfish'  # n01443537.
  assert prompts.normalize('A Photo, of: the "Cat".', lowercase=True) == 'a photo, of: the "cat".'
  assert prompts.normalize('A  Photo, of the Cat.', strip_punctuation=True) == 'A Photo of the Cat'


def _label_examples(labels, rng, key='label'):
  return [{'image': coloured_image(i, rng), key: l} for i, l in enumerate(labels)]


def test_imagenet_1000_classes_perfect_and_shuffled(mesh):
  rng = np.random.default_rng(0)
  labels = rng.choice(np.setdiff1d(np.arange(NUM), DUPLICATE), size=40, replace=False)
  seen = []
  with mock(_label_examples(labels, rng), seen):
    ev = evaluator(mesh, np.eye(NUM)[labels], ['imagenet2012', 'imagenet_v2'], 'clip7')
    calls = []
    texts = ev.predictor.texts
    ev.predictor.texts = lambda p, tokens, *a: calls.append(len(tokens)) or texts(p, tokens, *a)
    params = {}
    m = ev.run(params)
  assert seen == [('imagenet2012', 'validation'), ('imagenet_v2', 'test')]
  assert m == {f'zeroshot/{d}/top{k}': 1.0 for d in ('imagenet2012', 'imagenet_v2')
               for k in (1, 5)}
  assert sum(calls) == NUM * 7  # One classifier (1000 classes x 7 prompts) for both datasets.
  with mock(_label_examples(labels, rng)):
    # A second evaluator on the same Predictor and parameters reuses that classifier...
    other = zeroshot.ZeroShotEvaluator(ev.predictor, tokenizer='bytes', text_len=TEXT_LEN,
                                       pp_img=PP, datasets=['imagenet_sketch'], prompts='clip7')
    assert other.run(params)['zeroshot/imagenet_sketch/top1'] == 1.0
    assert sum(calls) == NUM * 7
    other.run(dict(params))  # ...until the parameters change (a new checkpoint).
    assert sum(calls) == NUM * 7 * 2
  perm = rng.permutation(len(labels))
  with mock(_label_examples(labels, rng)):
    m = evaluator(mesh, np.eye(NUM)[labels[perm]], ['imagenet2012']).run({})
  assert m['zeroshot/imagenet2012/top1'] == np.mean(labels[perm] == labels) < 0.1


@pytest.mark.parametrize('name', ['imagenet_a', 'imagenet_r'])
def test_200_class_subset_mapping(mesh, name):
  """Images score class 0 (outside the subset) highest and their true class second."""
  rng = np.random.default_rng(1)
  subset = np.array(prompts.class_subset(name))
  assert 0 not in subset
  labels = rng.choice(subset, size=30, replace=False)
  targets = np.eye(NUM)[labels] + 2.0 * np.eye(NUM)[0]
  seen = []
  with mock(_label_examples(labels, rng), seen):
    m = evaluator(mesh, targets, [name]).run({})
    assert seen == [(name, 'test')]
    assert m == {f'zeroshot/{name}/top1': 1.0, f'zeroshot/{name}/top5': 1.0}
    full = evaluator(mesh, targets, [dict(dataset=name, class_subset=[], name='all')]).run({})
    assert full['zeroshot/all/top1'] == 0.0 and full['zeroshot/all/top5'] == 1.0
    outside = np.setdiff1d(np.arange(NUM), subset)[:3]
  with mock(_label_examples(outside, rng)):
    with pytest.raises(ValueError, match='outside its class subset of 200'):
      evaluator(mesh, np.eye(NUM)[outside], [name]).run({})


def test_imagenet_real_any_correct_skips_empty(mesh):
  rng = np.random.default_rng(2)
  sets = [[5, 9], [9], [], [1, 2, 3], [], [7], [11, 12]]
  predicted = [9, 9, 4, 8, 4, 7, 13]  # Hits: rows 0, 1, 5 of the 5 non-empty sets.
  examples = [{'image': coloured_image(i, rng), 'real_label': np.array(s, np.int64)}
              for i, s in enumerate(sets)]
  with mock(examples):
    m = evaluator(mesh, np.eye(NUM)[predicted], ['imagenet2012_real']).run({})
  assert m['zeroshot/imagenet2012_real/top1'] == pytest.approx(3 / 5)


def test_small_datasets_clip_protocol_and_tfds_metadata(mesh):
  with mock([{'image': np.zeros((8, 8, 3), np.uint8), 'label': 0}]):
    ev = evaluator(mesh, np.eye(NUM), [
        'cifar10', 'cifar100', 'oxford_iiit_pet',
        dict(dataset='oxford_iiit_pet', classnames='tfds', prompts='clip7', name='pet_tfds')],
        prompt_set=None)
    # CIFAR's TFDS names come from its prepared metadata, absent here: a clear error.
    with pytest.raises(ValueError, match='cifar10 has no class names in its metadata'):
      evaluator(mesh, np.eye(NUM), [dict(dataset='cifar10', classnames='tfds')])
  (cifar10,), (cifar100,), (pets,), (pet_tfds,) = [list(s['tasks'].values()) for s in ev.sources]
  assert cifar10['classnames'][:2] == ('airplane', 'automobile') and len(cifar10['prompts']) == 18
  assert len(cifar100['classnames']) == 100 and cifar100['classnames'][1] == 'aquarium fish'
  assert cifar100['prompts'] == cifar10['prompts'] == prompts.templates('clip_cifar')
  assert pets['prompts'] == ('a photo of a {}, a type of pet.',)
  # CLIP's pet names, in TFDS label order: the same names as the metadata, up to case.
  assert len(pets['classnames']) == 37
  assert [n.lower() for n in pets['classnames']] == [n.lower() for n in pet_tfds['classnames']]
  assert pets['classnames'][:3] == ('Abyssinian', 'american bulldog', 'american pit bull terrier')
  assert pet_tfds['prompts'] == prompts.templates('clip7')
  assert pet_tfds['prefix'] == 'zeroshot/pet_tfds'
  with pytest.raises(ValueError, match="Unknown zero-shot dataset fields \\['labels'\\]"):
    evaluator(mesh, np.eye(NUM), [dict(dataset='cifar10', labels='x')])


def test_coco_captions_multi_caption_retrieval(mesh):
  rng = np.random.default_rng(3)
  n = 12
  counts = rng.integers(5, 8, size=n)  # COCO has 5 to 7 captions per image.
  caps = [[f'Image {i} Caption {j}' for j in range(c)] for i, c in enumerate(counts)]
  examples = [{'image': coloured_image(i, rng),
               'captions': {'text': np.array(c, object).astype(bytes),
                            'id': np.arange(len(c), dtype=np.int64)}}
              for i, c in enumerate(caps)]
  flat = [c.lower() for cs in caps for c in cs]  # Found only if lowercasing is applied.
  text_targets = np.eye(n)[np.repeat(np.arange(n), counts)]

  def run(img_targets):
    model = StubModel(image_fn=image_tower(img_targets), text_fn=text_tower(flat, text_targets))
    with mock(examples):
      ev = retrieval.RetrievalEvaluator(predict.Predictor(model, mesh), dataset='coco_captions',
                                        pp_img=PP, tokenizer='bytes', text_len=TEXT_LEN,
                                        lowercase=True, batch_size=8, chunk=5)
      assert ev.captions_key == 'captions/text'
      return ev.run({})

  m = run(np.eye(n))
  for d in ('i2t', 't2i'):
    assert m[f'retrieval/coco_captions/{d}_r1'] == 1.0
    assert m[f'retrieval/coco_captions/{d}_mean_rank'] == 1.0
  perm = rng.permutation(n)
  m = run(np.eye(n)[perm])
  # Image i embeds as image perm[i]: found iff perm[i] == i; ranks are then exact ties.
  want = np.mean(perm == np.arange(n))
  assert m['retrieval/coco_captions/i2t_r1'] == pytest.approx(want)
  assert m['retrieval/coco_captions/t2i_r1'] == pytest.approx(
      np.sum(counts[perm == np.arange(n)]) / counts.sum())


def test_standard_suites_build_from_config(mesh):
  """configs/evals.py suites: pp strings filled from the config, every knob accepted."""
  from configs import demo, evals
  c = demo.get_config('tiny')
  c.evals = {}
  c.evals.update(evals.imagenet_suite(prompts='clip7'))
  c.evals.update(evals.small_zeroshot_suite(datasets=['oxford_iiit_pet']))
  c.evals.update(evals.retrieval_suite())
  c.evals.update(evals.probe_suite(['oxford_iiit_pet'], shots=(1, 2)))
  c.evals.zeroshot_imagenet.datasets.append(
      dict(dataset='imagenet_v2/topimages', name='v2_top',
           pp_img='decode|resize({image_size})'))
  example = {'image': np.zeros((8, 8, 3), np.uint8), 'label': 1,
             'real_label': np.array([1, 2]), 'captions': {'text': np.array([b'a', b'b'])}}
  with mock([example]):  # Every feature any of the suites reads.
    evs = evaluate.build_evaluators(c, predict.Predictor(StubModel(), mesh))
  assert set(evs) == {'zeroshot_imagenet', 'zeroshot_small', 'retrieval_coco_captions',
                      'geometry_coco_captions', 'probe_oxford_iiit_pet'}
  zs = evs['zeroshot_imagenet'][0]
  assert [s['name'] for s in zs.sources] == [*evals.IMAGENET, 'v2_top']
  assert all(t['prompts'] == prompts.templates('clip7') for s in zs.sources
             for t in s['tasks'].values())
  assert evs['probe_oxford_iiit_pet'][0].num_classes == 37
  (pets,) = evs['zeroshot_small'][0].sources[0]['tasks'].values()
  assert pets['prompts'] == prompts.templates('clip_pets')  # The dataset's own protocol.
  c.evals.zeroshot_imagenet.bogus = 1
  with mock([example]), pytest.raises(TypeError, match="zeroshot_imagenet.*'bogus'"):
    evaluate.build_evaluators(c, predict.Predictor(StubModel(), mesh))


@pytest.mark.parametrize('hw, want', [((30, 60), (24, 48)), ((90, 45), (48, 24)),
                                      ((24, 24), (24, 24))])
def test_resize_small_keeps_aspect_and_range(hw, want):
  from mmcl.data import preprocess
  fn = preprocess.get_preprocess_fn('resize_small(24)')
  image = np.random.default_rng(0).integers(0, 256, size=hw + (3,)).astype(np.uint8)
  out = fn({'image': tf.constant(image)})['image'].numpy()
  assert out.shape == want + (3,) and out.dtype == np.float32
  assert 0 <= out.min() and out.max() <= 255  # Bicubic overshoot clipped to uint8's range.
  with pytest.raises(ValueError, match='positive int'):
    preprocess.get_preprocess_fn('resize_small((24, 24))')


def test_topk_hits_multilabel_matches_argsort():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(60, 9))
  sets = [rng.choice(9, size=rng.integers(1, 4), replace=False) for _ in range(60)]
  order = np.argsort(-logits, axis=1)
  for k in (1, 2, 5, 20):
    want = [bool(set(order[i, :k]) & set(sets[i])) for i in range(60)]
    np.testing.assert_array_equal(zeroshot.topk_hits(logits, sets, k, multilabel=True), want)
  assert 0 < zeroshot.topk_hits(logits, sets, 1, multilabel=True).mean() < 1
