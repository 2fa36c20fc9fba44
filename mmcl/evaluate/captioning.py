"""Evaluates the captioning decoder by generating from test images (mmcl/models/generate.py).

Per task (mmcl/data/decoder_tasks.py), on the first object of every image:
  cap   caption/exact: the generated caption is one of the image's captions (compared as
        tokens, each reference cut to the decoder length as training cuts it);
        caption/token_acc: teacher-forced next-token accuracy on the first caption;
  aref  aref/acc: IoU >= 0.5 between the box generated for the region caption and the
        true box (the usual referring-expression accuracy), aref/iou its mean;
  gcap  gcap/acc: the region caption generated for the true box is exactly the true one.
Generation is greedy, or beam search with `beam` > 1; boxes are constrained to location
tokens. The first `show` images' outputs are printed. One process only.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.data import decoder_tasks as tasks_lib
from mmcl.data import tokenizers
from mmcl.evaluate import predict
from mmcl.models import decoder as decoder_lib
from mmcl.models import generate
from mmcl.parallel import mesh as mesh_lib


class CaptioningEvaluator:
  """Greedy (or beam) captions, referring expressions and grounded captions of a split."""

  def __init__(self, predictor, *, dataset: str, pp_img: str, tokenizer: str, num_bins: int,
               split: str = 'test', tasks=tasks_lib.TASKS, captions_key: str = 'captions',
               boxes_key: str = 'objects/bbox', regions_key: str = 'objects/caption',
               batch_size: int = 256, beam: int = 1, show: int = 4, data_dir=None,
               text_len=None, name: str | None = None):
    del text_len  # The decoder's own max_len applies.
    if jax.process_count() > 1:
      raise NotImplementedError('The captioning evaluator runs in one process.')
    model = predictor.model
    if getattr(model, 'decoder', None) is None:
      raise ValueError('A captioning evaluator needs a model with a decoder '
                       '(config.model.decoder).')
    self.tasks = tasks_lib.check_tasks(tasks)
    self.name = name or dataset.split('/')[0].split(':')[0]
    self.tok = tokenizers.get_tokenizer(tokenizer)
    self.num_bins, self.batch_size, self.beam, self.show = num_bins, batch_size, beam, show
    self.keys = dict(captions=captions_key, boxes=boxes_key, regions=regions_key)
    self.dec = model.decoder_module(parent=None)
    self.length = self.dec.max_len
    if self.dec.vocab_size < self.tok.vocab_size + num_bins:
      raise ValueError(f'decoder vocab_size {self.dec.vocab_size} < tokenizer vocabulary '
                       f'{self.tok.vocab_size} + num_bins {num_bins}.')
    self._shards = mesh_lib.num_batch_shards(predictor.mesh)
    self._sharding = mesh_lib.batch_sharding(predictor.mesh)
    tops = sorted({k.split('/')[0] for k in self.keys.values()})
    keep = ', '.join(f'"{k}"' for k in ['image', *tops])
    self._ds = predict.eval_dataset(dataset, split, f'{pp_img}|keep({keep})', batch_size,
                                    data_dir)
    loc = np.zeros([self.dec.vocab_size], bool)
    loc[self.tok.vocab_size:self.tok.vocab_size + num_bins] = True
    self._loc_mask = jnp.asarray(loc)

    def logits_fn(params, encoded, inputs):
      return self.dec.apply({'params': params['dec']}, encoded, inputs)

    def encode(params, images):
      return model.apply({'params': params}, images, None)[2]['img/encoded']

    def run(params, images, prompt, start, stop, box_only: bool):
      encoded = encode(params, images)
      mask = self._loc_mask if box_only else None
      if self.beam > 1:
        enc = jnp.repeat(encoded, self.beam, axis=0)
        return generate.beam_search(functools.partial(logits_fn, params, enc), prompt, start,
                                    eos_id=self.tok.eos_id, beam=self.beam, stop_B=stop,
                                    token_mask_V=mask)[0]
      return generate.greedy(functools.partial(logits_fn, params, encoded), prompt, start,
                             eos_id=self.tok.eos_id, stop_B=stop, token_mask_V=mask)

    def teacher_forced(params, images, tokens):
      return jnp.argmax(logits_fn(params, encode(params, images),
                                  decoder_lib.shift_right(tokens)), -1)

    s = self._sharding
    self._generate = jax.jit(run, static_argnums=5, in_shardings=(None, s, s, s, s),
                             out_shardings=s)
    self._teacher = jax.jit(teacher_forced, in_shardings=(None, s, s), out_shardings=s)

  def _pad(self, *arrays):
    n = len(arrays[0])
    padded = -(-n // self._shards) * self._shards
    return [np.concatenate([a, np.zeros((padded - n,) + a.shape[1:], a.dtype)])
            if padded != n else a for a in arrays]

  def _prompts(self, task, regions, boxes):
    """(prompt [N, Ld], start [N], stop [N]) for the first object of every image."""
    n, ld = len(regions), self.length
    rows, start = np.zeros([n, ld], np.int32), np.zeros([n], np.int32)
    for i in range(n):
      ids = tasks_lib.prompt(self.tok, task, region=regions[i], box=boxes[i],
                             num_bins=self.num_bins)[:ld - 1]
      rows[i, :len(ids)], start[i] = ids, len(ids)
    stop = start + tasks_lib.BOX_TOKENS if task == 'aref' else np.full([n], ld, np.int32)
    return rows, start, stop.astype(np.int32)

  def _answer(self, row, start):
    """Generated tokens from `start` up to (without) EOS / padding."""
    out = []
    for t in row[start:]:
      if t in (self.tok.eos_id, tokenizers.PAD_ID):
        break
      out.append(int(t))
    return out

  def _text(self, ids):
    return self.tok.detokenize(np.asarray(ids + [self.tok.eos_id], np.int32))

  def batches(self):
    """The split's batches as (images, captions per image, first regions, first boxes)."""
    for batch in self._ds.as_numpy_iterator():
      yield self._examples(batch)

  def _examples(self, batch):
    images = batch.pop('image')
    feats = predict.flat_features(batch)
    n = len(images)
    captions = [[_str(c) for c in cs] for cs in feats[self.keys['captions']]]
    regions = [_str(r[0]) if len(r) else '' for r in feats.get(self.keys['regions'], [[]] * n)]
    boxes = [np.asarray(b, np.float64).reshape(-1, 4)[0] if len(b) else np.zeros(4)
             for b in feats.get(self.keys['boxes'], [[]] * n)]
    return images, captions, regions, boxes

  def generate(self, params, images, regions, boxes) -> dict[str, list[list[int]]]:
    """Each task's generated answer tokens (without EOS) for the given first objects."""
    out = {}
    for task in self.tasks:
      prompt, start, stop = self._prompts(task, regions, boxes)
      seq = np.asarray(self._generate(params, *self._pad(images, prompt, start, stop),
                                      task == 'aref'))[:len(images)]
      out[task] = [self._answer(seq[i], start[i]) for i in range(len(images))]
    return out

  def decode(self, task: str, answer: list[int]):
    """An answer's meaning: a normalised (y0, x0, y1, x1) box for aref, else its text."""
    if task != 'aref':
      return self._text(answer)
    padded = (answer + [self.tok.vocab_size] * tasks_lib.BOX_TOKENS)[:tasks_lib.BOX_TOKENS]
    return tasks_lib.tokens_to_box(np.asarray([padded]), self.num_bins, self.tok.vocab_size)[0]

  def run(self, params) -> dict[str, float]:
    hits = {k: [] for k in ('caption/exact', 'caption/token_acc', 'aref/acc', 'aref/iou',
                            'gcap/acc')}
    shown = []
    for images, captions, regions, boxes in self.batches():
      n = len(images)
      out = self.generate(params, images, regions, boxes)
      if 'cap' in out:
        prefix = tasks_lib.prompt(self.tok, 'cap')
        refs = [[tasks_lib.sequence(prefix, tasks_lib.text_ids(self.tok, c), self.length,
                                    self.tok.eos_id) for c in cs] for cs in captions]
        for answer, image_refs in zip(out['cap'], refs):
          got = answer + [self.tok.eos_id]
          hits['caption/exact'].append(any(
              got == [t for t in r[len(prefix):] if t != tokenizers.PAD_ID] for r, _ in image_refs))
        first = np.stack([r[0][0] for r in refs]).astype(np.int32)
        mask = np.stack([r[0][1] for r in refs])
        pred = np.asarray(self._teacher(params, *self._pad(images, first)))[:n]
        hits['caption/token_acc'].extend(np.sum((pred == first) * mask, 1) / mask.sum(1))
      if 'aref' in out:
        ious = tasks_lib.iou(np.stack([self.decode('aref', a) for a in out['aref']]),
                             np.stack(boxes))
        hits['aref/iou'].extend(ious)
        hits['aref/acc'].extend(ious >= 0.5)
      if 'gcap' in out:
        hits['gcap/acc'].extend(self._text(a) == r for a, r in zip(out['gcap'], regions))
      for i in range(min(n, self.show - len(shown))):
        line = {'captions[0]': captions[i][0], 'region': regions[i],
                'box': np.round(boxes[i], 3).tolist()}
        for task, answers in out.items():
          value = self.decode(task, answers[i])
          line[task] = value if task != 'aref' else np.round(value, 3).tolist()
        shown.append(line)
    self.shown = shown
    for i, line in enumerate(shown):
      print(f'{self.name} test image {i}: ' + '; '.join(f'{k}: {v}' for k, v in line.items()),
            flush=True)
    return {f'captioning/{self.name}/{k}': float(np.mean(v)) for k, v in hits.items() if v}


def _str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)
