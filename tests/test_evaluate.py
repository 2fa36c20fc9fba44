"""Evaluators: retrieval ranks, top-k, zero-shot classifiers, the padded Predictor."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import demo
from mmcl import evaluate
from mmcl.data import shapes
from mmcl.data import tokenizers
from mmcl.evaluate import predict
from mmcl.evaluate import prompts as prompts_lib
from mmcl.evaluate import retrieval
from mmcl.evaluate import zeroshot
from mmcl.parallel import mesh as mesh_lib

DATASET = 'mmcl_shapes/tiny'
PP_IMG = 'decode|value_range(-1, 1)'
TEXT_LEN = 40


class StubModel:
  """Two-tower stand-in: `image_fn(images)` / `text_fn(tokens)` are the towers."""

  def __init__(self, image_fn=None, text_fn=None):
    self.image_fn = image_fn
    self.text_fn = text_fn

  def apply(self, variables, images, tokens, *, train):
    assert train is False
    assert set(variables) == {'params'}
    zimg = None if images is None else self.image_fn(images)
    ztxt = None if tokens is None else self.text_fn(tokens)
    return zimg, ztxt


def image_lookup(images_u8, targets):
  """image_fn sending each dataset image (after value_range(-1, 1)) to its targets row.

  Images are identified by 8 random linear projections, matched to the nearest ones.
  """
  w = np.random.default_rng(0).normal(size=images_u8.shape[1:] + (8,)).astype(np.float32)
  table = np.einsum('nhwc,hwck->nk', images_u8 / 127.5 - 1.0, w)
  dist = np.linalg.norm(table[:, None] - table[None, :], axis=-1) + np.eye(len(table)) * 1e9
  assert dist.min() > 1.0  # Fingerprints identify images unambiguously.
  table = jnp.asarray(table, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)

  def fn(images):
    fp = jnp.einsum('bhwc,hwck->bk', images.astype(jnp.float32), w)
    dist = jnp.sum(jnp.square(fp[:, None, :] - table[None, :, :]), axis=-1)
    return targets[jnp.argmin(dist, axis=1)]

  return fn


def text_lookup(token_rows, targets):
  """text_fn sending each row of `token_rows` to its targets row (unknown rows -> 0)."""
  assert len({r.tobytes() for r in token_rows}) == len(token_rows)
  table = jnp.asarray(token_rows)
  targets = jnp.asarray(targets, jnp.float32)

  def fn(tokens):
    match = jnp.all(tokens[:, None, :] == table[None, :, :], axis=-1)
    return match.astype(jnp.float32) @ targets

  return fn


@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.create_mesh([('data', -1)])


@pytest.fixture(scope='module')
def test_split(shapes_data_dir):
  """The tiny test split read straight from TFDS, as numpy arrays."""
  builder = tfds.builder(DATASET, data_dir=shapes_data_dir)
  examples = list(tfds.as_numpy(builder.as_dataset(split='test', shuffle_files=False)))
  out = {k: np.stack([e[k] for e in examples])
         for k in ('image', 'shape', 'color', 'num_objects')}
  out['captions'] = [[c.decode('utf-8') for c in e['captions']] for e in examples]
  return out


# ---------------------------------------------------------------- retrieval


def brute_ranks(zimg, ztxt, image_of_text):
  """Ranks by sorting every score row (descending), one row at a time."""
  n, m = len(zimg), len(ztxt)
  i2t = np.empty(n, np.int64)
  for i in range(n):
    order = sorted(range(m), key=lambda j: -float(np.dot(zimg[i], ztxt[j])))
    i2t[i] = min(pos for pos, j in enumerate(order) if image_of_text[j] == i)
  t2i = np.empty(m, np.int64)
  for j in range(m):
    order = sorted(range(n), key=lambda i: -float(np.dot(ztxt[j], zimg[i])))
    t2i[j] = order.index(image_of_text[j])
  return i2t, t2i


def brute_metrics(zimg, ztxt, image_of_text, prefix):
  """Recall@k from the top-k lists themselves, plus mean/median 1-based ranks."""
  n, m = len(zimg), len(ztxt)
  i2t, t2i = brute_ranks(zimg, ztxt, image_of_text)
  scores = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
  out = {}
  for k in retrieval.KS:
    top_txt = np.argsort(-scores, axis=1)[:, :k]
    out[f'{prefix}/i2t_r{k}'] = np.mean(
        [any(image_of_text[j] == i for j in top_txt[i]) for i in range(n)])
    top_img = np.argsort(-scores.T, axis=1)[:, :k]
    out[f'{prefix}/t2i_r{k}'] = np.mean([image_of_text[j] in top_img[j] for j in range(m)])
  for name, ranks in (('i2t', i2t), ('t2i', t2i)):
    out[f'{prefix}/{name}_mean_rank'] = sum(ranks + 1) / len(ranks)
    out[f'{prefix}/{name}_median_rank'] = float(np.median(ranks + 1))
  return out


def random_retrieval_data(seed, n=23, d=6):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 5, size=n)  # 1 to 4 captions per image, uneven.
  image_of_text = np.repeat(np.arange(n), counts)
  rng.shuffle(image_of_text)
  zimg = rng.normal(size=(n, d))
  ztxt = rng.normal(size=(len(image_of_text), d))
  return zimg, ztxt, image_of_text


@pytest.mark.parametrize('chunk', [1, 3, 7, 1024])
def test_retrieval_ranks_match_brute_force(chunk):
  for seed in range(3):
    zimg, ztxt, image_of_text = random_retrieval_data(seed)
    i2t, t2i = retrieval.retrieval_ranks(zimg, ztxt, image_of_text, chunk=chunk)
    ref_i2t, ref_t2i = brute_ranks(zimg, ztxt, image_of_text)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)
    assert i2t.shape == (len(zimg),) and t2i.shape == (len(ztxt),)


def test_retrieval_metrics_match_brute_force():
  zimg, ztxt, image_of_text = random_retrieval_data(5, n=40, d=4)
  i2t, t2i = retrieval.retrieval_ranks(zimg, ztxt, image_of_text, chunk=3)
  got = retrieval.retrieval_metrics(i2t, t2i, 'retrieval/x')
  want = brute_metrics(zimg, ztxt, image_of_text, 'retrieval/x')
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k] == pytest.approx(v), k
  # Small d: the data is hard enough for the recalls to be informative.
  assert 0 < got['retrieval/x/i2t_r1'] < got['retrieval/x/i2t_r10'] <= 1


def test_retrieval_perfect_alignment():
  rng = np.random.default_rng(0)
  zimg = rng.normal(size=(20, 32))
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  image_of_text = np.repeat(np.arange(20), rng.integers(1, 4, size=20))
  ztxt = zimg[image_of_text]
  i2t, t2i = retrieval.retrieval_ranks(zimg, ztxt, image_of_text, chunk=3)
  m = retrieval.retrieval_metrics(i2t, t2i, 'p')
  for direction in ('i2t', 't2i'):
    for k in retrieval.KS:
      assert m[f'p/{direction}_r{k}'] == 1.0
    assert m[f'p/{direction}_mean_rank'] == 1.0
    assert m[f'p/{direction}_median_rank'] == 1.0


# ---------------------------------------------------------------- top-k


def test_topk_correct_matches_argsort():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(200, 9))
  labels = rng.integers(0, 9, size=200)
  order = np.argsort(-logits, axis=1)
  for k in (1, 2, 5, 9, 20):
    want = np.array([labels[i] in order[i, :k] for i in range(len(labels))])
    got = predict.topk_correct(logits, labels, k)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, want)
  assert predict.topk_correct(logits, labels, 9).all()
  assert 0 < predict.topk_correct(logits, labels, 1).mean() < 0.5


# ---------------------------------------------------------------- predictor


@pytest.mark.parametrize('n, batch_size', [(13, 5), (13, 256), (3, 8), (16, 8), (17, 9)])
def test_predictor_pads_and_returns_exactly_n_rows(mesh, n, batch_size):
  rng = np.random.default_rng(n)
  proj = rng.normal(size=(10, 4)).astype(np.float32)
  model = StubModel(image_fn=lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ proj),
                    text_fn=lambda t: t.astype(jnp.float32) @ proj[:t.shape[1]] + 1.0)
  pred = predict.Predictor(model, mesh)
  images = rng.normal(size=(n, 5, 2)).astype(np.float32)
  z = pred.images({}, images, batch_size)
  assert z.shape == (n, 4) and z.dtype == np.float32
  np.testing.assert_allclose(z, np.tanh(images.reshape(n, -1).astype(np.float64) @ proj),
                             rtol=1e-5, atol=1e-6)
  tokens = rng.integers(0, 50, size=(n, 7)).astype(np.int32)
  zt = pred.texts({}, tokens, batch_size)
  assert zt.shape == (n, 4)
  np.testing.assert_allclose(zt, tokens.astype(np.float64) @ proj[:7] + 1.0, rtol=1e-5,
                             atol=1e-4)


# ---------------------------------------------------------------- zero-shot


def test_class_embeddings_average_normalised_prompt_embeddings(mesh):
  rng = np.random.default_rng(1)
  text_len = 16
  proj = rng.normal(size=(text_len, 5)).astype(np.float32)
  model = StubModel(text_fn=lambda t: t.astype(jnp.float32) @ proj)
  pred = predict.Predictor(model, mesh)
  tok = tokenizers.get_tokenizer('bytes')
  classnames = ['red', 'blue', 'green square']
  templates = ['a {}', 'a {} thing!', '{}']
  got = zeroshot.class_embeddings(pred, {}, classnames, templates, tok, text_len)
  want = []
  for c in classnames:
    zs = [tok.tokenize(t.format(c), text_len)[0].astype(np.float64) @ proj for t in templates]
    mean = np.mean([z / np.linalg.norm(z) for z in zs], axis=0)
    want.append(mean / np.linalg.norm(mean))
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-6)
  # The mean of normalised vectors is not the normalised mean of raw ones here.
  raw = [np.mean([tok.tokenize(t.format(c), text_len)[0] @ proj for t in templates], axis=0)
         for c in classnames]
  assert not np.allclose(got, np.stack([r / np.linalg.norm(r) for r in raw]), atol=1e-4)
  lower = zeroshot.class_embeddings(pred, {}, ['RED', 'Blue', 'GREEN Square'], templates, tok,
                                    text_len, lowercase=True)
  np.testing.assert_allclose(lower, got, rtol=1e-6)


def _color_encoding_model(test_split):
  """Images embed their colour label; prompt texts embed a one-hot of their class index.

  Image row for colour y: v_j = -((j - y) mod 8), so the ranking of classes is
  y, y+1, ..., y+7 (mod 8) with no ties. Colour prompts -> one-hot(colour index), shape
  names -> one-hot(shape index): colour is solved exactly, shape is scored against colour.
  """
  num = len(shapes.COLORS)
  assert len(shapes.SHAPES) == num
  colors = test_split['color']
  img_targets = -((np.arange(num)[None, :] - colors[:, None]) % num)
  tok = tokenizers.get_tokenizer('bytes')
  texts, vecs = [], []
  for i, name in enumerate(shapes.COLORS):
    for t in shapes.PROMPTS['color']:
      texts.append(t.format(name))
      vecs.append(np.eye(num)[i])
  for i, name in enumerate(shapes.SHAPES):
    texts.append(name)
    vecs.append(np.eye(num)[i])
  return StubModel(image_fn=image_lookup(test_split['image'], img_targets),
                   text_fn=text_lookup(tok.tokenize(texts, TEXT_LEN), np.stack(vecs)))


@pytest.fixture(scope='module')
def color_predictor(mesh, test_split):
  return predict.Predictor(_color_encoding_model(test_split), mesh)


def _evaluator(predictor, data_dir, tasks):
  return zeroshot.ZeroShotEvaluator(
      predictor, dataset=DATASET, split='test', pp_img=PP_IMG, tasks=tasks,
      tokenizer='bytes', text_len=TEXT_LEN, data_dir=data_dir, batch_size=48)


def test_zeroshot_evaluator_exact_and_chance_tasks(color_predictor, shapes_data_dir,
                                                   test_split):
  single = test_split['num_objects'] == 1
  assert 0 < single.sum() < len(single)  # The filter is not trivial on this split.
  tasks = {
      'color': dict(label_key='color', prompts='mmcl_shapes/color'),
      'shape': dict(label_key='shape'),
      'shape1': dict(label_key='shape', classnames='tfds', prompts='classname',
                     where={'num_objects': 1}),
      'shape_rb': dict(label_key='shape', where={'num_objects': [2], 'color': [0, 2]}),
  }
  metrics = _evaluator(color_predictor, shapes_data_dir, tasks).run({})
  assert set(metrics) == {f'zeroshot/mmcl_shapes/{t}/top{k}' for t in tasks for k in (1, 5)}
  for k, v in metrics.items():
    assert isinstance(v, float) and 0.0 <= v <= 1.0, k
  for t in tasks:
    assert metrics[f'zeroshot/mmcl_shapes/{t}/top5'] >= metrics[f'zeroshot/mmcl_shapes/{t}/top1']
  assert metrics['zeroshot/mmcl_shapes/color/top1'] == 1.0
  assert metrics['zeroshot/mmcl_shapes/color/top5'] == 1.0
  # Shape is predicted as "the shape with the colour's index": right iff they coincide.
  shape, color = test_split['shape'], test_split['color']
  offset = (shape - color) % len(shapes.SHAPES)
  subsets = {'shape': np.ones_like(single), 'shape1': single,
             'shape_rb': (test_split['num_objects'] == 2) & np.isin(color, [0, 2])}
  for t, keep in subsets.items():
    assert keep.sum() > 0
    assert metrics[f'zeroshot/mmcl_shapes/{t}/top1'] == pytest.approx(np.mean(offset[keep] == 0))
    assert metrics[f'zeroshot/mmcl_shapes/{t}/top5'] == pytest.approx(np.mean(offset[keep] < 5))
  assert metrics['zeroshot/mmcl_shapes/shape/top1'] < 0.4  # Near chance (1/8).
  # The filtered and unfiltered tasks really score different image sets.
  assert np.mean(offset[single] == 0) != np.mean(offset == 0)


def test_zeroshot_where_selecting_nothing_raises(color_predictor, shapes_data_dir):
  ev = _evaluator(color_predictor, shapes_data_dir,
                  {'none': dict(label_key='color', where={'num_objects': 7})})
  with pytest.raises(ValueError, match='selects no image'):
    ev.run({})


@pytest.mark.parametrize('task, match', [
    (dict(label_key='color', prompts='no_such_set'), r"valid: \['classname', 'clip7', 'clip80',"),
    (dict(label_key='color', prompts='mmcl_shapes/nope'), 'mmcl_shapes/color'),
    (dict(label_key='color', classnames='imagenet21k'), r"valid: \['tfds', 'imagenet', 'cifar10'"),
    (dict(label_key='color', class_subset='imagenet_b'), r"\['imagenet_a', 'imagenet_r'\]"),
    (dict(label_key='color', labels='x'), "valid: 'label_key', 'classnames'"),
    (dict(label_key='captions'), 'no ClassLabel feature'),
    (dict(label_key='color', prompts=['no placeholder']), 'exactly one'),
])
def test_zeroshot_bad_task_specs_raise(mesh, shapes_data_dir, task, match):
  pred = predict.Predictor(StubModel(), mesh)
  with pytest.raises(ValueError, match=match):
    _evaluator(pred, shapes_data_dir, {'t': task})


def test_prompt_sets_and_tfds_classnames(shapes_data_dir):
  assert prompts_lib.templates('classname') == ('{}',)
  assert prompts_lib.templates('mmcl_shapes/shape') == tuple(shapes.PROMPTS['shape'])
  assert prompts_lib.templates(['x {} y']) == ('x {} y',)
  builder = tfds.builder(DATASET, data_dir=shapes_data_dir)
  assert prompts_lib.classnames('tfds', builder, 'combo') == shapes.COMBO_NAMES
  assert prompts_lib.classnames(['a', 'b'], builder, 'combo') == ('a', 'b')


# ---------------------------------------------------------------- retrieval evaluator


def strict_rank_metrics(zimg, ztxt, image_of_text, prefix):
  """Metrics from ranks = how many candidates score strictly higher (ties favour the match)."""
  scores = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
  n, m = scores.shape
  best_own = [max(scores[i, j] for j in range(m) if image_of_text[j] == i) for i in range(n)]
  i2t = np.array([np.count_nonzero(scores[i] > best_own[i]) for i in range(n)])
  t2i = np.array([np.count_nonzero(scores[:, j] > scores[image_of_text[j], j])
                  for j in range(m)])
  out = {}
  for name, ranks in (('i2t', i2t), ('t2i', t2i)):
    for k in retrieval.KS:
      out[f'{prefix}/{name}_r{k}'] = sum(r < k for r in ranks) / len(ranks)
    out[f'{prefix}/{name}_mean_rank'] = sum(ranks + 1) / len(ranks)
    out[f'{prefix}/{name}_median_rank'] = float(np.median(ranks + 1))
  # The evaluator's summaries: DataComp's mean of both R@1, and RSUM / 6.
  out[f'{prefix}/mean_r1'] = (np.mean(i2t < 1) + np.mean(t2i < 1)) / 2
  out[f'{prefix}/mean_recall'] = sum(np.mean(r < k) for r in (i2t, t2i)
                                     for k in (1, 5, 10)) / 6
  return out


def test_retrieval_evaluator_matches_brute_force(mesh, shapes_data_dir, test_split):
  """End to end on the test split: random image/caption embeddings keyed by content.

  Some captions are shared by several images, so their embeddings tie exactly; the
  embeddings are multiples of 1/64, making every score exact in float32 as well.
  """
  c = demo.get_config('tiny')
  c.data_dir = shapes_data_dir
  rng = np.random.default_rng(3)
  n = len(test_split['image'])
  zimg = rng.integers(-256, 257, size=(n, 16)) / 64
  tok = tokenizers.get_tokenizer(c.tokenizer)
  rows, row_id = [], {}
  image_of_text, text_rows = [], []
  for i, captions in enumerate(test_split['captions']):
    for cap in captions:
      row = tok.tokenize(cap, c.text_len)[0]
      if row.tobytes() not in row_id:
        row_id[row.tobytes()] = len(rows)
        rows.append(row)
      image_of_text.append(i)
      text_rows.append(row_id[row.tobytes()])
  assert len(rows) < len(text_rows)  # Shared captions exist: ties are exercised.
  ztab = rng.integers(-256, 257, size=(len(rows), 16)) / 64
  model = StubModel(image_fn=image_lookup(test_split['image'], zimg),
                    text_fn=text_lookup(np.stack(rows), ztab))
  evaluators = evaluate.build_evaluators(c, predict.Predictor(model, mesh))
  ev, every = evaluators['retrieval']
  assert every == 0
  got = ev.run({})
  want = strict_rank_metrics(zimg, ztab[text_rows], np.asarray(image_of_text),
                             'retrieval/mmcl_shapes')
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-9), k
  assert 0 < got['retrieval/mmcl_shapes/i2t_r1'] < 1


def test_build_evaluators(mesh, shapes_data_dir):
  c = demo.get_config('tiny')
  c.data_dir = shapes_data_dir
  c.text_len = 24
  c.evals.zeroshot.every = 7
  pred = predict.Predictor(StubModel(), mesh)
  evaluators = evaluate.build_evaluators(c, pred)
  assert set(evaluators) == {'zeroshot', 'retrieval', 'probe', 'geometry'}
  zs, every = evaluators['zeroshot']
  assert isinstance(zs, zeroshot.ZeroShotEvaluator) and every == 7
  assert zs.text_len == 24 and zs.name == 'mmcl_shapes'
  assert set(zs.tasks) == {'shape', 'color', 'combo'}
  assert zs.tasks['color']['prompts'] == tuple(shapes.PROMPTS['color'])
  assert isinstance(evaluators['retrieval'][0], retrieval.RetrievalEvaluator)


def test_build_evaluators_rejects_unknown_type(mesh, shapes_data_dir):
  c = demo.get_config('tiny')
  c.data_dir = shapes_data_dir
  c.evals.bogus = dict(type='logistic_probe', every=0)
  valid = re.escape(str(sorted(evaluate.EVALUATORS)))  # Other types register themselves.
  assert {'captioning', 'geometry', 'linear_probe', 'probe', 'retrieval',
          'zeroshot'} <= set(evaluate.EVALUATORS)
  with pytest.raises(ValueError, match=r"'logistic_probe'.*bogus.*" + valid):
    evaluate.build_evaluators(c, predict.Predictor(StubModel(), mesh))


def test_predictor_output_is_host_numpy(mesh):
  model = StubModel(image_fn=lambda x: x * 2.0)
  out = predict.Predictor(model, mesh).images({}, np.ones((9, 3), np.float32), 4)
  assert isinstance(out, np.ndarray) and not isinstance(out, jax.Array)
  np.testing.assert_array_equal(out, np.full((9, 3), 2.0, np.float32))
