"""Embedding functions for evaluators: jitted, batch-sharded, padded to full batches.

With several processes every process embeds its own share of a dataset (its local rows of
each global batch); `host_sum` and `host_concat` combine per-process results.
"""
import jax
import numpy as np

from mmcl.models import naflex
from mmcl.parallel import mesh as mesh_lib


class Predictor:
  """Embeds images or token arrays with a two-tower-style model's `apply`.

  Inputs of any length are padded up to a multiple of the number of batch shards, so one
  compiled function per input shape serves every batch, and padding rows are dropped.
  """

  def __init__(self, model, mesh):
    self.model, self.mesh = model, mesh  # The model also serves generation (captioning.py).
    self._shards = mesh_lib.num_batch_shards(mesh)
    sharding = mesh_lib.batch_sharding(mesh)
    self._sharding = sharding

    def embed_images(params, images):
      return model.apply({'params': params}, images, None, train=False)[0]

    def embed_texts(params, tokens):
      return model.apply({'params': params}, None, tokens, train=False)[1]

    self.image_fn = jax.jit(embed_images, in_shardings=(None, sharding), out_shardings=sharding)
    self.text_fn = jax.jit(embed_texts, in_shardings=(None, sharding), out_shardings=sharding)
    self._memo_params, self._memo = None, {}

  def memo(self, params, key, compute):
    """compute() once per params object (one checkpoint) and key, shared by evaluators."""
    if params is not self._memo_params:  # New parameters: drop the old results.
      self._memo_params, self._memo = params, {}
    if key not in self._memo:
      self._memo[key] = compute()
    return self._memo[key]

  def _run(self, fn, params, x, batch_size: int) -> np.ndarray:
    """`x`: an array, or a dict of arrays with the same rows (NaFlex's patch dict)."""
    if jax.process_count() > 1:
      return self._run_multiprocess(fn, params, x, batch_size)
    batch_size = -(-batch_size // self._shards) * self._shards
    out = []
    for start in range(0, _rows(x), batch_size):
      chunk = _take(x, start, start + batch_size)
      n = _rows(chunk)
      z = fn(params, jax.device_put(_pad(chunk, -(-n // self._shards) * self._shards),
                                    self._sharding))
      out.append(np.asarray(jax.device_get(z), np.float32)[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def _run_multiprocess(self, fn, params, x, batch_size):
    """Each process passes its own rows; every process runs the same number of batches."""
    local_shards = max(self._shards // jax.process_count(), 1)
    local_bs = -(-max(batch_size // jax.process_count(), 1) // local_shards) * local_shards
    steps = int(host_max(-(-_rows(x) // local_bs)))
    out = []
    for i in range(steps):
      chunk = _take(x, i * local_bs, (i + 1) * local_bs)
      n = _rows(chunk)
      z = fn(params, jax.tree.map(
          lambda a: jax.make_array_from_process_local_data(self._sharding, a),
          _pad(chunk, local_bs)))
      shards = {s.index[0].start or 0: s.data for s in z.addressable_shards}  # Dedup replicas.
      local = np.concatenate([np.asarray(shards[k], np.float32) for k in sorted(shards)])
      out.append(local[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def images(self, params, images, batch_size: int = 256) -> np.ndarray:
    """`images` [N, H, W, 3], or NaFlex's patch dict of N rows (one compile per budget)."""
    return self._run(self.image_fn, params, images, batch_size)

  def texts(self, params, tokens: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    return self._run(self.text_fn, params, tokens, batch_size)


def _rows(x) -> int:
  return len(jax.tree.leaves(x)[0])


def _take(x, start: int, stop: int):
  return jax.tree.map(lambda a: np.asarray(a[start:stop]), x)


def _pad(x, rows: int):
  """Zero rows appended up to `rows` (NaFlex: an all-padding patch dict, masked out)."""
  return jax.tree.map(lambda a: a if len(a) == rows else np.concatenate(
      [a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)]), x)


def topk_correct(logits_NxC: np.ndarray, labels_N: np.ndarray, k: int) -> np.ndarray:
  """Boolean [N]: whether the label is among the k highest-scoring classes."""
  k = min(k, logits_NxC.shape[1])
  topk = np.argpartition(-logits_NxC, k - 1, axis=1)[:, :k]
  return np.any(topk == labels_N[:, None], axis=1)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def host_sum(x) -> np.ndarray:
  """Sum over processes of a per-process numpy array (identity with one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)


def host_max(x) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x))).max(axis=0)


def host_concat(x_NxD: np.ndarray) -> np.ndarray:
  """Rows of every process, in process order (each process may hold a different count)."""
  if jax.process_count() == 1:
    return x_NxD
  from jax.experimental import multihost_utils
  x_NxD = np.asarray(x_NxD)
  counts = np.asarray(multihost_utils.process_allgather(np.asarray(len(x_NxD))))
  padded = np.zeros((int(counts.max()),) + x_NxD.shape[1:], x_NxD.dtype)
  padded[:len(x_NxD)] = x_NxD
  every = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([every[p, :c] for p, c in enumerate(counts)])


def flat_features(batch: dict, prefix: str = '') -> dict:
  """{'captions/text': [per-example values]} from a (nested, maybe ragged) numpy batch."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, dict):
      out.update(flat_features(v, f'{prefix}{k}/'))
    else:
      out[prefix + k] = v.to_list() if hasattr(v, 'to_list') else list(v)
  return out


def eval_dataset(name: str, split: str, pp: str, batch_size: int, data_dir=None,
                 source_options: dict | None = None):
  """One ordered pass over this process's share of a split, in batches of ~batch_size/P.
  A file source ('csv:...', 'wds:...') has no splits: `source_options` set how it is read."""
  from mmcl.data import input_pipeline  # Lazy: tf.data only for evaluators that read data.
  p = jax.process_count()
  return input_pipeline.get_dataset(
      name=name, split=split, pp=pp, batch_size=-(-batch_size // p) * p, data_dir=data_dir,
      train=False, process_index=jax.process_index(), process_count=p,
      source_options=source_options)


def embed_dataset(predictor: Predictor, params, ds, batch_size: int, image_key: str = 'image'):
  """(this process's image embeddings [N, D], {feature: list of N values}) of `ds`.

  Batches with NaFlex patches (pp op patchify_naflex) are embedded as their patch dict.

  With several processes, a process whose share ran out embeds empty batches until every
  share is done: each batch is a collective, so all processes must make the same calls.
  """
  zimg, features, empty = [], {}, None
  it = ds.as_numpy_iterator()
  while True:
    batch = next(it, None)
    if not host_max(batch is not None):
      break
    if batch is None:
      zimg.append(predictor.images(params, empty, batch_size))
      continue
    images = batch.pop(image_key)
    if naflex.MASK in batch:  # NaFlex: the patch dict (mmcl/models/naflex.py).
      images = {image_key: images, **{k: batch.pop(k) for k in naflex.KEYS}}
    empty = jax.tree.map(lambda a: a[:0], images)
    zimg.append(predictor.images(params, images, batch_size))
    for k, v in flat_features(batch).items():
      features.setdefault(k, []).extend(v)
  zimg = [z for z in zimg if z.size]
  return (np.concatenate(zimg) if zimg else np.zeros((0, 0), np.float32)), features
