"""Embedding functions for evaluators: jitted, batch-sharded, padded to full batches."""
import jax
import numpy as np

from mmcl.parallel import mesh as mesh_lib


class Predictor:
  """Embeds images or token arrays with a two-tower-style model's `apply`.

  Inputs of any length are padded up to a multiple of the number of batch shards, so one
  compiled function per input shape serves every batch, and padding rows are dropped.
  """

  def __init__(self, model, mesh):
    self.mesh = mesh
    self._shards = mesh_lib.num_batch_shards(mesh)
    sharding = mesh_lib.batch_sharding(mesh)
    self._sharding = sharding

    def embed_images(params, images):
      return model.apply({'params': params}, images, None, train=False)[0]

    def embed_texts(params, tokens):
      return model.apply({'params': params}, None, tokens, train=False)[1]

    self._images = jax.jit(embed_images, in_shardings=(None, sharding), out_shardings=sharding)
    self._texts = jax.jit(embed_texts, in_shardings=(None, sharding), out_shardings=sharding)

  def _run(self, fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    batch_size = -(-batch_size // self._shards) * self._shards
    out = []
    for start in range(0, len(x), batch_size):
      chunk = np.asarray(x[start:start + batch_size])
      n = len(chunk)
      padded = -(-n // self._shards) * self._shards
      if padded != n:
        chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)])
      z = fn(params, jax.device_put(chunk, self._sharding))
      out.append(np.asarray(jax.device_get(z), np.float32)[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def images(self, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return self._run(self._images, params, images, batch_size)

  def texts(self, params, tokens: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    return self._run(self._texts, params, tokens, batch_size)


def topk_correct(logits_NxC: np.ndarray, labels_N: np.ndarray, k: int) -> np.ndarray:
  """Boolean [N]: whether the label is among the k highest-scoring classes."""
  k = min(k, logits_NxC.shape[1])
  topk = np.argpartition(-logits_NxC, k - 1, axis=1)[:, :k]
  return np.any(topk == labels_N[:, None], axis=1)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
