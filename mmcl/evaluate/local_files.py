"""Benchmarks released as files (json/jsonl + images) in a directory, local or gs://.

The annotation files are read through mmcl.fs; images through tf.io.read_file inside a
tf.data map (parallel decode; gs:// too), then the evaluator's pp string. A box crops the
decoded image before pp (ARO's VG crops), as PIL's `crop` with coordinates rounded and
clamped to the image.

Several processes: the distinct images (or texts) are split into equal contiguous shares,
the last one padded by repeating the final item, so every process makes the same embedding
calls (each is a collective; an empty share would hang) and the gathered rows come back in
order. Scores are cosine similarities (embeddings are L2-normalised here).
"""
import json

import jax
import numpy as np
import tensorflow as tf

from mmcl import fs
from mmcl.data import preprocess, tokenizers
from mmcl.evaluate import predict
from mmcl.evaluate import prompts as prompts_lib
from mmcl.evaluate.predict import Predictor


def _check_file(path, what: str, hint: str = ''):
  if not fs.exists(path):
    raise FileNotFoundError(f'{what}: {path} not found{hint} (see docs/evaluation.md for the '
                            'expected layout; nothing is downloaded).')


def read_json(path, what: str):
  _check_file(path, what)
  with fs.open(path) as f:
    return json.load(f)


def read_jsonl(path, what: str) -> list:
  _check_file(path, what)
  with fs.open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def require(entry, keys, what: str, where) -> None:
  """A clear error for an annotation entry that lacks fields of the released format."""
  missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
  if missing:
    have = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
    raise ValueError(f'{what}: entry {where} lacks {missing} (has {have}); is this the '
                     'released file?')


def process_share(n: int, count: int | None = None, index: int | None = None) -> np.ndarray:
  """Indices of this process's contiguous share of n items, padded to ceil(n / count)."""
  count = jax.process_count() if count is None else count
  index = jax.process_index() if index is None else index
  per = -(-n // count)
  return np.minimum(np.arange(index * per, (index + 1) * per), n - 1)


def _gather(local_NxD: np.ndarray, n: int) -> np.ndarray:
  return predict.l2_normalize(predict.host_concat(local_NxD)[:n])


def _crop(image, box):
  """PIL-style crop (x, y, w, h), rounded and clamped so at least one pixel remains."""
  hw = tf.shape(image)[:2]
  x0, y0 = tf.cast(tf.round(box[0]), tf.int32), tf.cast(tf.round(box[1]), tf.int32)
  x1 = tf.cast(tf.round(box[0] + box[2]), tf.int32)
  y1 = tf.cast(tf.round(box[1] + box[3]), tf.int32)
  x0, y0 = tf.clip_by_value(x0, 0, hw[1] - 1), tf.clip_by_value(y0, 0, hw[0] - 1)
  x1, y1 = tf.clip_by_value(x1, x0 + 1, hw[1]), tf.clip_by_value(y1, y0 + 1, hw[0])
  return image[y0:y1, x0:x1]


def image_batches(paths, pp: str, batch_size: int, boxes=None):
  """tf.data of pp'ed image batches of `paths` (each cropped to its box, if given)."""
  pp_fn = preprocess.get_preprocess_fn(pp)
  crop = boxes is not None
  boxes = np.zeros((len(paths), 4), np.float32) if boxes is None else boxes

  def load(path, box):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return pp_fn({'image': _crop(image, box) if crop else image})['image']

  ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(boxes, np.float32)))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size).prefetch(2)


class LocalBenchmark:
  """Base of the file-based evaluators: embeds distinct images and texts once per run."""

  def __init__(self, predictor: Predictor, *, pp_img: str, tokenizer: str, text_len: int,
               data_dir=None, batch_size: int = 256, lowercase: bool = False,
               strip_punctuation: bool = False):
    del data_dir  # These benchmarks are not TFDS datasets: each reads its own `root`.
    self.predictor, self.pp_img, self.batch_size = predictor, pp_img, batch_size
    preprocess.get_preprocess_fn(pp_img)  # A bad pp string fails when the evaluator is built.
    self.tokenizer = tokenizers.get_tokenizer(tokenizer)
    self.text_len, self.lowercase, self.strip_punctuation = text_len, lowercase, strip_punctuation

  def embed_images(self, params, paths, boxes=None) -> tuple[np.ndarray, np.ndarray]:
    """(normalised embeddings [U, D] of the distinct (path, box) pairs, row of each input)."""
    keys = [(p, tuple(b)) for p, b in zip(paths, boxes)] if boxes is not None else list(paths)
    rows = {}
    inverse = np.array([rows.setdefault(k, len(rows)) for k in keys], np.int64)
    unique = list(rows)
    if not unique:
      return np.zeros((0, 0), np.float32), inverse
    _check_file(unique[0][0] if boxes is not None else unique[0], 'image',
                ' (wrong root or image_dir?)')
    idx = process_share(len(unique))
    u_paths = [unique[i][0] if boxes is not None else unique[i] for i in idx]
    u_boxes = (np.array([unique[i][1] for i in idx], np.float32)
               if boxes is not None else None)
    local_bs = -(-self.batch_size // jax.process_count())
    ds = image_batches(u_paths, self.pp_img, local_bs, u_boxes)
    z = [self.predictor.images(params, b, self.batch_size) for b in ds.as_numpy_iterator()]
    return _gather(np.concatenate(z), len(unique)), inverse

  def embed_texts(self, params, texts) -> tuple[np.ndarray, np.ndarray]:
    """(normalised embeddings [U, D] of the distinct normalised texts, row of each input)."""
    texts = [prompts_lib.normalize(t, self.lowercase, self.strip_punctuation) for t in texts]
    rows = {}
    inverse = np.array([rows.setdefault(t, len(rows)) for t in texts], np.int64)
    unique = list(rows)
    if not unique:
      return np.zeros((0, 0), np.float32), inverse
    local = [unique[i] for i in process_share(len(unique))]
    z = self.predictor.texts(params, self.tokenizer.tokenize(local, self.text_len))
    return _gather(z, len(unique)), inverse

  def scores(self, params, paths, texts_per_item, boxes=None) -> np.ndarray:
    """[N, K] cosine similarity of item i's image with each of its K texts."""
    zimg, img_row = self.embed_images(params, paths, boxes)
    k = len(texts_per_item[0])
    if any(len(t) != k for t in texts_per_item):
      raise ValueError(f'Every item needs the same number of texts ({k}).')
    ztxt, txt_row = self.embed_texts(params, [t for ts in texts_per_item for t in ts])
    txt_row = txt_row.reshape(len(texts_per_item), k)
    return np.einsum('nd,nkd->nk', zimg[img_row], ztxt[txt_row])
