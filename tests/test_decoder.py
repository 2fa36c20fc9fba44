"""The captioning decoder: causal mask, teacher forcing against float64 numpy, parallel
prediction's masking, the padding-free loss, box tokens, beam search vs exhaustive search,
the decoder_tasks pp op, and a short SigLIP 2 (sigmoid + LocCa) run whose losses fall."""
import itertools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.data import decoder_tasks as tasks_lib
from mmcl.data import tokenizers
from mmcl.models import decoder as decoder_lib
from mmcl.models import generate
from mmcl.models import two_towers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L, N, E = 11, 6, 5, 24  # vocab, decoder length, image tokens, image width


def _decoder(**kw):
  kw = {**dict(vocab_size=V, width=16, depth=2, mlp_dim=32, num_heads=2, max_len=L,
               tie_embedding=True), **kw}
  return decoder_lib.TextDecoder(**kw)


def _init(dec, seed=0, b=3):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  enc = jax.random.normal(k1, (b, N, E))
  tokens = jax.random.randint(k2, (b, dec.max_len), 1, dec.vocab_size)
  params = jax.jit(dec.init)(k3, enc, tokens)['params']
  # Random (not zero-initialised) head so that outputs depend on everything.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(k3, p.shape), params)
  return params, enc, tokens


def _apply(dec):
  return jax.jit(lambda p, *a: dec.apply({'params': p}, *a))


def test_causal_mask_position_t_ignores_later_tokens():
  dec = _decoder()
  params, enc, tokens = _init(dec)
  apply = _apply(dec)
  out = apply(params, enc, tokens)
  for t in range(L - 1):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] % (V - 1)) + 1)
    out2 = apply(params, enc, changed)
    np.testing.assert_allclose(out2[:, :t + 1], out[:, :t + 1], atol=1e-6)
    assert np.abs(np.asarray(out2[:, t + 1:] - out[:, t + 1:])).max() > 1e-4


def _np_ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _np_mha(q_in, kv_in, p, mask=None):
  q = np.einsum('bld,dhk->blhk', q_in, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('bld,dhk->blhk', kv_in, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('bld,dhk->blhk', kv_in, p['value']['kernel']) + p['value']['bias']
  w = np.einsum('bqhk,bshk->bhqs', q / np.sqrt(q.shape[-1]), k)
  if mask is not None:
    w = np.where(mask, w, -1e300)
  w = np.exp(w - w.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  y = np.einsum('bhqs,bshk->bqhk', w, v)
  return np.einsum('bqhk,hkd->bqd', y, p['out']['kernel']) + p['out']['bias']


def _np_decoder(params, enc, inputs, parallel=None):
  """Float64 numpy forward pass of TextDecoder (tied head, gelu_tanh MLP)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  enc = np.asarray(enc, np.float64)
  b, l = inputs.shape
  x = p['embedding']['embedding'][np.asarray(inputs)] + p['pos_embedding'][:, :l]
  mask = np.tril(np.ones((l, l), bool))[None, None]
  if parallel is not None:
    mask = mask | np.asarray(parallel)[:, None, None, None]
  gelu = lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
  i = 0
  while f'decoderblock_{i}' in p:
    blk = p[f'decoderblock_{i}']
    y = _np_ln(x, blk['LayerNorm_self'])
    x = x + _np_mha(y, y, blk['SelfAttn'], mask)
    y = _np_ln(x, blk['LayerNorm_cross'])
    x = x + _np_mha(y, enc, blk['CrossAttn'])
    y = _np_ln(x, blk['LayerNorm_mlp'])
    m = blk['MlpBlock']
    x = x + gelu(y @ m['Dense_0']['kernel'] + m['Dense_0']['bias']) @ m['Dense_1']['kernel'] + (
        m['Dense_1']['bias'])
    i += 1
  x = _np_ln(x, p['decoder_norm'])
  return x @ p['embedding']['embedding'][:V].T


def test_teacher_forcing_matches_float64_reference_sharded():
  dec = _decoder()
  params, enc, tokens = _init(dec, seed=1, b=8)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  inputs = decoder_lib.shift_right(tokens)
  parallel = jnp.arange(8) % 2 == 0
  fn = jax.jit(lambda p, e, i, par: dec.apply({'params': p}, e, i, par),
               in_shardings=(None, rows, rows, rows))
  got = fn(params, enc, inputs, parallel)
  want = _np_decoder(params, enc, inputs, parallel)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_parallel_prediction_masks_the_answer_and_sees_no_answer_token():
  dec = _decoder(parallel_prob=1.0)
  params, enc, tokens = _init(dec, seed=2)
  # Row layout: 2 prompt tokens, 3 scored tokens (answer + EOS), 1 pad.
  tokens = tokens.at[:, 5].set(0)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 0]] * 3, jnp.int32)
  par = jnp.asarray([True, True, False])
  inputs = dec.inputs(tokens, mask, par)
  np.testing.assert_array_equal(inputs[:2, :2], tokens[:2, :2])  # The prompt stays.
  assert np.all(np.asarray(inputs[:2, 2:]) == dec.mask_id)  # Answer and pad: [MASK].
  np.testing.assert_array_equal(inputs[2], decoder_lib.shift_right(tokens)[2])
  # Parallel rows' logits do not depend on the answer tokens; autoregressive rows' do.
  changed = tokens.at[:, 2:5].set((tokens[:, 2:5] % (V - 1)) + 1)
  apply = _apply(dec)
  run = lambda t: apply(params, enc, dec.inputs(t, mask, par), par)
  a, b = np.asarray(run(tokens)), np.asarray(run(changed))
  np.testing.assert_allclose(a[:2], b[:2], atol=1e-6)
  assert np.abs(a[2, 3:] - b[2, 3:]).max() > 1e-4
  # In training, parallel rows are drawn with the dropout rng at the configured rate.
  dec = _decoder(parallel_prob=0.75)
  big = jnp.ones((4000, L), jnp.int32)
  _, m = jax.jit(lambda p: dec.apply(
      {'params': p}, jnp.zeros((4000, N, E)), big, jnp.ones_like(big), train=True,
      rngs={'dropout': jax.random.key(0)}, method='loss'))(params)
  assert abs(float(m['decoder/parallel_frac']) - 0.75) < 0.03


def test_caption_loss_ignores_padding_and_prompt():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, L, V)).astype(np.float32)
  tokens = rng.integers(1, V, (3, L)).astype(np.int32)
  mask = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], np.int32)
  loss_fn = jax.jit(decoder_lib.caption_loss)
  loss, metrics = loss_fn(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  with jax.enable_x64(True):
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    want = (ce * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Whatever sits at unscored positions does not matter.
  logits2, tokens2 = logits.copy(), tokens.copy()
  logits2[mask == 0] = 50 * rng.normal(size=((mask == 0).sum(), V))
  tokens2[mask == 0] = 0
  loss2, _ = loss_fn(jnp.asarray(logits2), jnp.asarray(tokens2), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
  assert 0.0 <= float(metrics['decoder/token_acc']) <= 1.0


@pytest.mark.parametrize('num_bins', [1, 7, 32, 1000])
def test_box_tokens_round_trip(num_bins):
  rng = np.random.default_rng(num_bins)
  base = 258
  tokens = rng.integers(base, base + num_bins, (50, 4))
  boxes = tasks_lib.tokens_to_box(tokens, num_bins, base)
  np.testing.assert_array_equal(tasks_lib.box_to_tokens(boxes, num_bins, base), tokens)
  coords = np.concatenate([rng.uniform(0, 1, (50, 4)), [[0, 0, 1, 1]]])
  back = tasks_lib.tokens_to_box(tasks_lib.box_to_tokens(coords, num_bins, base), num_bins,
                                 base)
  assert np.abs(back - coords).max() <= 0.5 / num_bins + 1e-12


def test_iou():
  a = np.array([[0, 0, 0.5, 0.5], [0, 0, 1, 1], [0, 0, 0.2, 0.2]])
  b = np.array([[0.25, 0.25, 0.75, 0.75], [0, 0, 1, 1], [0.5, 0.5, 1, 1]])
  np.testing.assert_allclose(tasks_lib.iou(a, b), [0.0625 / 0.4375, 1.0, 0.0])


def _tiny_lm(seed=0, vocab=5, length=4):
  dec = _decoder(vocab_size=vocab, max_len=length)
  params, enc, _ = _init(dec, seed=seed, b=1)
  # One image for every row (any batch of prompts, hypotheses or candidates).
  return lambda inputs: dec.apply({'params': params}, jnp.broadcast_to(
      enc, (inputs.shape[0],) + enc.shape[1:]), inputs)


def _exhaustive(logits_fn, prompt, start, eos, vocab, length):
  """Best (sequence, log-prob) over every generable continuation of `prompt`: each ends at
  its first EOS or runs to the end of the buffer; all are scored in one teacher-forced call."""
  n = length - start
  seqs, conts = [], []
  for k in range(1, n + 1):
    for cont in itertools.product(range(1, vocab), repeat=k):
      if eos in cont[:-1] or (k < n and cont[-1] != eos):
        continue
      seq = np.array(prompt)
      seq[start:start + k], seq[start + k:] = cont, 0
      seqs.append(seq)
      conts.append(cont)
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits_fn(decoder_lib.shift_right(
      jnp.asarray(np.stack(seqs))))).at[..., 0].set(-1e30), -1), np.float64)
  scores = [sum(logp[j, start + i, c] for i, c in enumerate(cont))
            for j, cont in enumerate(conts)]
  best = int(np.argmax(scores))
  return seqs[best], scores[best]


@pytest.mark.parametrize('seed', [0, 1])
def test_beam_search_equals_exhaustive_search(seed):
  vocab, length, start, eos = 5, 4, 1, 1
  logits_fn = _tiny_lm(seed, vocab, length)
  prompt = np.zeros((2, length), np.int32)
  prompt[:, 0] = 3
  start_B = jnp.full((2,), start)
  want_seq, want_score = _exhaustive(logits_fn, prompt[0], start, eos, vocab, length)
  beam = (vocab - 1) ** (length - start)  # Wide enough to be exact.
  seq, score = jax.jit(lambda p: generate.beam_search(
      logits_fn, p, start_B, eos_id=eos, beam=beam))(jnp.asarray(prompt))
  np.testing.assert_array_equal(np.asarray(seq[0]), want_seq)
  np.testing.assert_allclose(float(score[0]), want_score, rtol=1e-4, atol=1e-4)
  # Beam 1 is greedy search.
  greedy = jax.jit(lambda p: generate.greedy(logits_fn, p, start_B, eos_id=eos))(
      jnp.asarray(prompt))
  one, _ = jax.jit(lambda p: generate.beam_search(logits_fn, p, start_B, eos_id=eos, beam=1))(
      jnp.asarray(prompt))
  np.testing.assert_array_equal(np.asarray(one), np.asarray(greedy))


def test_greedy_respects_stop_and_token_mask():
  logits_fn = _tiny_lm(3, vocab=5, length=4)
  prompt = jnp.asarray([[3, 0, 0, 0], [2, 4, 0, 0]], jnp.int32)
  allowed = jnp.asarray([False, False, True, True, False])  # Neither EOS nor 4.
  seq = jax.jit(lambda p: generate.greedy(logits_fn, p, jnp.asarray([1, 2]), eos_id=1,
                                          stop_B=jnp.asarray([3, 3]), token_mask_V=allowed))(
                                              prompt)
  seq = np.asarray(seq)
  np.testing.assert_array_equal(seq[:, :1], [[3], [2]])
  assert seq[1, 1] == 4  # The prompt is kept.
  assert set(seq[0, 1:3]) <= {2, 3} and seq[1, 2] in (2, 3)
  assert seq[0, 3] == 0 and seq[1, 3] == 0  # Nothing written at or past stop.


def test_decoder_tasks_pp_op_matches_numpy_layout():
  import tensorflow as tf
  from mmcl.data import preprocess
  tok = tokenizers.get_tokenizer('bytes')
  box = np.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32)
  regions = ['red circle', 'blue ring']
  example = {'texts': tf.constant('a red circle'),
             'objects': {'bbox': tf.constant(box), 'caption': tf.constant(regions)}}

  def expected(task, i):  # (tokens, mask) of `task` on object i, built in numpy.
    answer = {'cap': tasks_lib.text_ids(tok, 'a red circle'),
              'aref': list(tasks_lib.box_to_tokens(box[i:i + 1], 10, tok.vocab_size)[0]),
              'gcap': tasks_lib.text_ids(tok, regions[i])}[task]
    prefix = tasks_lib.prompt(tok, task, region=regions[i], box=box[i], num_bins=10)
    return tasks_lib.sequence(prefix, answer, 24, tok.eos_id)

  seen = set()
  for task in tasks_lib.TASKS:
    fn = preprocess.get_preprocess_fn(f'decoder_tasks(max_len=24, tasks=("{task}",), '
                                      'num_bins=10)')
    for s in range(8):
      out = fn({**example, '_seed': tf.constant([s, 7], tf.int64)})
      got = out['dec_tokens'].numpy(), out['dec_loss_mask'].numpy()
      match = [i for i in range(2) if all(np.array_equal(g, w)
                                          for g, w in zip(got, expected(task, i)))]
      assert match, (task, got)
      seen.add((task, match[-1]))
  assert {('aref', 0), ('aref', 1), ('gcap', 0), ('gcap', 1)} <= seen  # Objects sampled.
  # Mixed tasks: every task appears.
  fn = preprocess.get_preprocess_fn('decoder_tasks(max_len=24, num_bins=10)')
  firsts = {int(fn({**example, '_seed': tf.constant([s, 1], tf.int64)})['dec_tokens'][0])
            for s in range(30)}
  assert firsts == {tasks_lib.text_ids(tok, p)[0] for p in ('c', 'a', 'g')}
  with pytest.raises(ValueError, match='valid'):
    preprocess.get_preprocess_fn('decoder_tasks(max_len=24, tasks=("caption",))')


def test_two_towers_without_decoder_keeps_its_parameter_tree():
  kw = dict(image=dict(variant='pico/8'), text=dict(variant='pico', vocab_size=258,
                                                    max_len=8), embed_dim=16)
  image, text = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, 8), jnp.int32)
  plain = two_towers.TwoTowers(**kw).init(jax.random.key(0), image, text)['params']
  dec = two_towers.TwoTowers(**kw, decoder=dict(variant='pico', depth=1, vocab_size=290,
                                                max_len=8))
  params = dec.init(jax.random.key(0), image, text)['params']
  assert set(params) == set(plain) | {'dec'}
  assert jax.tree.structure(plain['img']) == jax.tree.structure(params['img'])
  _, _, out = dec.apply({'params': params}, image, text, dec_tokens=jnp.ones((2, 8), jnp.int32),
                        dec_loss_mask=jnp.ones((2, 8), jnp.int32))
  np.testing.assert_allclose(float(out['metrics']['decoder/loss']), math.log(290), rtol=1e-5)
  with pytest.raises(ValueError, match='Unknown field'):
    two_towers.TwoTowers(**kw, decoder=dict(variant='pico', vocab_size=290, depht=1))


@pytest.mark.slow
def test_siglip2_tiny_run_losses_fall(shapes_data_dir, tmp_path):
  from configs import siglip2_demo
  from mmcl.train import loop
  from mmcl.train import metrics as metrics_lib
  c = siglip2_demo.get_config('tiny')
  c.data_dir, c.progress_bar = shapes_data_dir, False
  c.update_from_flattened_dict(dict(total_steps=24, log_every=1, ckpt_every=100))
  c.evals = {'captioning': dict(c.evals.captioning, split='test[:16]')}
  final = loop.run(c, str(tmp_path))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if 'train/loss' in r]
  dec = [r['train/decoder/loss'] for r in rows]
  sig = [r['train/loss'] for r in rows]
  assert np.mean(dec[-5:]) < np.mean(dec[:5]) - 0.5, dec
  assert np.mean(sig[-5:]) < np.mean(sig[:5]), sig
  for k in ('caption/exact', 'caption/token_acc', 'aref/acc', 'gcap/acc'):
    assert 0.0 <= final[f'captioning/mmcl_shapes/{k}'] <= 1.0

  # The picture's outputs are the evaluator's: the same greedy answers it prints.
  from mmcl import evaluate
  from mmcl.evaluate import caption_plot
  from mmcl.train import checkpoint_eval
  model, mesh, params, _ = checkpoint_eval.restore_params(c, str(tmp_path))
  evaluator, _ = evaluate.build_evaluators(c, evaluate.Predictor(model, mesh))['captioning']
  evaluator.show = 3
  evaluator.run(params)
  rows = caption_plot.outputs(evaluator, params, 3)
  assert len(rows) == 3
  for row, shown in zip(rows, evaluator.shown):
    assert row['cap'] == shown['cap'] and row['gcap'] == shown['gcap']
    np.testing.assert_allclose(row['aref'], shown['aref'], atol=1e-3)
    np.testing.assert_allclose(row['box'], shown['box'], atol=1e-3)
    assert row['image'].shape == (64, 64, 3) and row['caption'] == shown['captions[0]']
  # The CLI draws the same checkpoint.
  out = tmp_path / 'captions.png'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'caption_figure.py'),
         f'--config={os.path.join(ROOT, "configs", "siglip2_demo.py")}:tiny',
         f'--workdir={tmp_path}', f'--out={out}', '--num=2', f'--config.data_dir={shapes_data_dir}',
         '--config.evals.captioning.split=test[:16]']
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'image 1: caption: {rows[1]["caption"]}' in done.stdout
  assert f"cap: {rows[1]['cap']}" in done.stdout
  assert plt_image(out).shape[2] in (3, 4)


def plt_image(path):
  import matplotlib.image
  return matplotlib.image.imread(str(path))


def test_caption_plot_draws_true_and_predicted_boxes_where_they_are(tmp_path):
  from mmcl.evaluate import caption_plot
  # A black image, the true box on its left half, the predicted one on the right half.
  row = dict(image=-np.ones((64, 64, 3), np.float32), caption='a cat', region='cat',
             box=np.array([0.1, 0.05, 0.9, 0.45]), aref=np.array([0.1, 0.55, 0.9, 0.95]),
             cap='a dog', gcap='dog')
  img = plt_image(caption_plot.draw([row], str(tmp_path / 'p.png'), columns=1))[..., :3]
  green = (img[..., 1] > 0.6) & (img[..., 0] < 0.4) & (img[..., 2] < 0.4)
  red = (img[..., 0] > 0.6) & (img[..., 1] < 0.4) & (img[..., 2] < 0.4)
  _, gx = np.nonzero(green)
  _, rx = np.nonzero(red)
  assert green.sum() > 50 and red.sum() > 50
  # Every red pixel is right of every green one (the boxes do not overlap).
  assert gx.max() < rx.min()


def test_shapes_boxes_and_region_captions(shapes_data_dir):
  import tensorflow_datasets as tfds
  from mmcl.data import shapes
  builder = tfds.builder('mmcl_shapes/tiny', data_dir=shapes_data_dir)
  assert str(builder.info.version) == '1.1.0'
  for ex in tfds.as_numpy(builder.as_dataset(split='test').take(16)):
    boxes, names = ex['objects']['bbox'], [c.decode() for c in ex['objects']['caption']]
    assert len(boxes) == len(names) == ex['num_objects']
    assert np.all((0 <= boxes) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
    assert names[0] == f'{shapes.COLORS[ex["color"]]} {shapes.SHAPES[ex["shape"]]}'
    # The box holds the object: its colour dominates inside, the background outside.
    h, w = ex['image'].shape[:2]
    y0, x0, y1, x1 = np.round(boxes[0] * [h, w, h, w]).astype(int)
    inside = ex['image'][y0:y1, x0:x1].reshape(-1, 3).astype(float)
    from mmcl.data.shapes import generator
    rgb = generator.COLOR_RGB[ex['color']]
    close = np.linalg.norm(inside - rgb, axis=1) < 60
    assert close.mean() > 0.2, close.mean()


def test_siglip2_recipes_settings():
  from configs import siglip2_b16, siglip2_demo
  c = siglip2_b16.get_config()
  assert (c.batch_size, c.image_size, c.text_len, c.schedule.warmup_steps) == (
      32_768, 256, 64, 20_000)
  assert (c.loss.name, c.lr, c.optim.weight_decay, c.contrastive_weight) == (
      'sigmoid', 1e-3, 1e-4, 1.0)
  assert (c.model.decoder.variant, c.model.decoder.depth) == ('B', 6)  # Half the text's 12.
  coca, cappa = siglip2_demo.get_config('coca'), siglip2_demo.get_config('cappa')
  assert (coca.loss.name, coca.model.decoder.loss_weight) == ('softmax', 2.0)
  assert (cappa.contrastive_weight, cappa.model.decoder.parallel_prob) == (0.0, 0.75)
  assert siglip2_demo.get_config().model.decoder.parallel_prob == 0.75  # LocCa + CapPa's.
  assert coca.model.decoder.parallel_prob == 0.0
  assert 'decoder' not in siglip2_demo.get_config('nodecoder').model
  with pytest.raises(ValueError, match=r"at most one of \('locca', 'coca'"):
    siglip2_demo.get_config('coca,cappa')
