"""The captioning decoder's inputs: task prefixes, boxes as coordinate tokens, and the pp op.

A decoder example is one token row `dec_tokens` (int32 [Ld]) = prefix + answer + EOS, right-
padded with 0, and `dec_loss_mask` (int32 [Ld]): 1 on the answer and its EOS (the tokens the
loss scores), 0 on the prefix and the padding. Tasks (LocCa, Wan et al. 2024, "Visual
Pretraining with Location-aware Captioners": Cap, ARef, GCap, one sampled per example):

  cap   'cap:'                  -> the image caption
  aref  'aref:' + region caption -> the region's box as 4 coordinate tokens (automatic
                                    referring expression)
  gcap  'gcap:' + 4 box tokens   -> the region caption (grounded captioning)

A box is normalised (y0, x0, y1, x1) in [0, 1] (TFDS's BBoxFeature order). Each coordinate is
quantised into `num_bins` equal bins and bin k is the token `loc_base + k`, where loc_base is
the text tokenizer's vocabulary size: the decoder's vocabulary is text + num_bins location
tokens (boxes written as tokens, as in Pix2Seq and LocCa; the bin count is a config).
"""
from __future__ import annotations

import numpy as np

from mmcl.data import tokenizers

TASKS = ('cap', 'aref', 'gcap')
PREFIX = {'cap': 'cap:', 'aref': 'aref:', 'gcap': 'gcap:'}
BOX_TOKENS = 4


def check_tasks(tasks) -> tuple[str, ...]:
  tasks = tuple(tasks)
  bad = [t for t in tasks if t not in TASKS]
  if not tasks or bad:
    raise ValueError(f'Unknown decoder task(s) {bad or tasks!r}; valid: {TASKS}.')
  return tasks


# --- Boxes <-> tokens (numpy; the pp op below uses the same formulas in TensorFlow).


def quantize(coords, num_bins: int) -> np.ndarray:
  """Coordinates in [0, 1] -> bins 0..num_bins-1 (1.0 falls into the last bin). In float32,
  as the pp op computes it, so both give the same bin (0.9 * 10 is 9 in float32, 8.99.. in
  float64 of the float32 0.9)."""
  scaled = np.asarray(coords, np.float32) * np.float32(num_bins)
  return np.clip(np.floor(scaled), 0, num_bins - 1).astype(np.int32)


def dequantize(bins, num_bins: int) -> np.ndarray:
  """Bins -> the centre of each bin, so |dequantize(quantize(c)) - c| <= 0.5 / num_bins."""
  return (np.asarray(bins, np.float64) + 0.5) / num_bins


def box_to_tokens(box_Nx4, num_bins: int, loc_base: int) -> np.ndarray:
  return quantize(box_Nx4, num_bins) + loc_base


def tokens_to_box(tokens_Nx4, num_bins: int, loc_base: int) -> np.ndarray:
  """Coordinate tokens -> boxes; a non-location token is clipped to the nearest bin."""
  bins = np.clip(np.asarray(tokens_Nx4) - loc_base, 0, num_bins - 1)
  return dequantize(bins, num_bins)


def iou(a_Nx4, b_Nx4) -> np.ndarray:
  """Intersection over union of (y0, x0, y1, x1) boxes, row by row; 0 for empty unions."""
  a, b = np.asarray(a_Nx4, np.float64), np.asarray(b_Nx4, np.float64)
  h = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
  w = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  union = area(a) + area(b) - h * w
  return np.where(union > 0, h * w / np.maximum(union, 1e-12), 0.0)


# --- Sequences (numpy, for evaluation and generation prompts).


def text_ids(tok, text: str) -> list[int]:
  """The tokenizer's ids of `text` without EOS and padding."""
  row = tok.tokenize(text, 1024)[0]
  return [int(i) for i in row[:int(np.sum(row != tokenizers.PAD_ID)) - 1]]


def sequence(prefix: list[int], answer: list[int], max_len: int, eos_id: int):
  """(tokens [max_len], loss_mask [max_len]): prefix + answer + EOS, cut to max_len with the
  EOS kept last (the answer is cut first). The pp op `decoder_tasks` packs the same way."""
  answer = list(answer)[:max(max_len - len(prefix) - 1, 0)] + [eos_id]
  ids = (list(prefix) + answer)[-max_len:]
  tokens = np.zeros([max_len], np.int32)
  mask = np.zeros([max_len], np.int32)
  tokens[:len(ids)] = ids
  mask[len(ids) - len(answer):len(ids)] = 1
  return tokens, mask


def prompt(tok, task: str, *, region: str = '', box=None, num_bins: int = 0) -> list[int]:
  """The prefix ids of `task` (aref needs `region`, gcap needs `box`)."""
  ids = text_ids(tok, PREFIX[task])
  if task == 'aref':
    ids += text_ids(tok, region)
  elif task == 'gcap':
    ids += [int(t) for t in box_to_tokens(np.asarray(box)[None], num_bins, tok.vocab_size)[0]]
  return ids


# --- The pp op.


def _register():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmcl.data import preprocess  # pylint: disable=g-import-not-at-top

  def feature(data, key):
    """data['a/b'] as data['a']['b'] (TFDS nests Sequence-of-dict features)."""
    value = data
    for part in key.split('/'):
      if not isinstance(value, dict) or part not in value:
        raise KeyError(f"pp op 'decoder_tasks' needs key {key!r}; available keys: "
                       f'{sorted(data)}.')
      value = value[part]
    return value

  @preprocess.register_op('decoder_tasks')
  def _decoder_tasks(max_len, tokenizer='bytes', tasks=TASKS, weights=None, num_bins=32,
                     caption_key='texts', boxes_key='objects/bbox',
                     regions_key='objects/caption', outkey='dec'):
    """Writes `<outkey>_tokens` and `<outkey>_loss_mask` (int32 [max_len]) for one task
    sampled per example (with `weights`, default uniform) from `tasks`; aref and gcap
    use one object drawn at random, and fall back to cap for an example without objects.
    Needs _seed. `caption_key` holds one caption (e.g. after `choice`)."""
    tok = tokenizers.get_tokenizer(tokenizer)
    names = check_tasks(tasks)
    if not isinstance(max_len, int) or max_len < 8:
      raise ValueError(f'decoder_tasks: max_len must be an int >= 8, got {max_len!r}.')
    if not isinstance(num_bins, int) or num_bins < 1:
      raise ValueError(f'decoder_tasks: num_bins must be a positive int, got {num_bins!r}.')
    w = np.ones(len(names)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(names),) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f'decoder_tasks: weights {weights!r} must be {len(names)} '
                       f'non-negative numbers (one per task in {names}).')
    logits = tf.constant(np.log(np.maximum(w / w.sum(), 1e-30))[None], tf.float32)
    eos = tf.constant([tok.eos_id], tf.int32)

    def ids(text):  # Text ids without EOS and padding.
      row = tok.tokenize_tf(text, max_len)
      return row[:tf.reduce_sum(tf.cast(row != tokenizers.PAD_ID, tf.int32)) - 1]

    def pack(prefix, answer):
      answer = tf.concat([answer[:tf.maximum(max_len - tf.shape(prefix)[0] - 1, 0)], eos], 0)
      seq = tf.concat([prefix, answer], 0)[-max_len:]
      n, m = tf.shape(seq)[0], tf.shape(answer)[0]
      mask = tf.concat([tf.zeros([n - m], tf.int32), tf.ones([m], tf.int32)], 0)
      pad = [[0, max_len - n]]
      return (tf.ensure_shape(tf.pad(seq, pad), [max_len]),
              tf.ensure_shape(tf.pad(mask, pad), [max_len]))

    def box_tokens(box):
      bins = tf.clip_by_value(tf.floor(tf.cast(box, tf.float32) * num_bins), 0, num_bins - 1)
      return tf.cast(bins, tf.int32) + tok.vocab_size

    def _op(data):
      data = dict(data)
      seed = preprocess.next_seed(data, 'decoder_tasks')
      s_task, s_obj = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
      task = tf.random.stateless_categorical(logits, 1, s_task, dtype=tf.int32)[0, 0]
      caption = ids(feature(data, caption_key))
      branches = {'cap': lambda: pack(ids(PREFIX['cap']), caption)}
      if 'aref' in names or 'gcap' in names:
        boxes = tf.reshape(feature(data, boxes_key), [-1, 4])
        regions = tf.reshape(feature(data, regions_key), [-1])
        n = tf.shape(boxes)[0]
        obj = tf.random.stateless_uniform([], s_obj, 0, tf.maximum(n, 1), tf.int32)
        box = lambda: box_tokens(boxes[obj])
        region = lambda: ids(regions[obj])
        branches['aref'] = lambda: pack(tf.concat([ids(PREFIX['aref']), region()], 0), box())
        branches['gcap'] = lambda: pack(tf.concat([ids(PREFIX['gcap']), box()], 0), region())
        needs_box = tf.reduce_any(tf.equal(task, [i for i, t in enumerate(names) if t != 'cap']))
        task = tf.where(needs_box & (n == 0), names.index('cap') if 'cap' in names else task,
                        task)
      tokens, mask = tf.switch_case(task, [branches[t] for t in names])
      data[f'{outkey}_tokens'], data[f'{outkey}_loss_mask'] = tokens, mask
      return data

    return _op


_register()
