r"""What rounding the loss's matmul inputs to bf16 does to the logits and the loss.

  python tools/bench_precision.py [--batch 4096] [--dim 512] [--scale 100]

A TPU's default matmul precision rounds float32 inputs to bf16 (one MXU pass). This tool
makes CLIP-like embeddings (unit vectors, each positive pair at cosine ~0.3 above the
negatives' ~0), computes the logits s * x.y and the softmax and sigmoid losses with the
inputs rounded to bf16 and in float32, and prints one JSON line: the logits' mean and max
absolute error and each loss's relative change. mmcl computes the heads, logits and loss
at HIGHEST precision (mmcl.losses.registry.PRECISION) because of these figures.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np


def embeddings(batch: int, dim: int, cosine: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim))
  y = cosine * x / np.linalg.norm(x, axis=1, keepdims=True) + rng.normal(size=(batch, dim)) * (
      np.sqrt(1 - cosine**2) / np.sqrt(dim))
  unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
  return unit(x), unit(y)


def losses(logits):
  n = logits.shape[0]
  eye = jnp.eye(n, dtype=bool)
  softmax = (jnp.mean(jax.nn.logsumexp(logits, 1) - jnp.diag(logits)) +
             jnp.mean(jax.nn.logsumexp(logits, 0) - jnp.diag(logits))) / 2
  sigmoid = -jnp.sum(jax.nn.log_sigmoid(jnp.where(eye, 1.0, -1.0) * (logits - 10.0))) / n
  return {'softmax': float(softmax), 'sigmoid': float(sigmoid)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=4096)
  p.add_argument('--dim', type=int, default=512)
  p.add_argument('--scale', type=float, default=100.0)
  p.add_argument('--cosine', type=float, default=0.3)
  a = p.parse_args()
  x, y = embeddings(a.batch, a.dim, a.cosine)
  exact = a.scale * (jnp.asarray(x, jnp.float64) @ jnp.asarray(y, jnp.float64).T)
  bf16 = lambda z: jnp.asarray(z, jnp.bfloat16).astype(jnp.float32)
  rounded = a.scale * jnp.matmul(bf16(x), bf16(y).T, precision='highest')
  full = a.scale * jnp.matmul(jnp.asarray(x), jnp.asarray(y).T, precision='highest')
  err = np.abs(np.asarray(rounded, np.float64) - np.asarray(exact))
  err32 = np.abs(np.asarray(full, np.float64) - np.asarray(exact))
  l_round, l_full = losses(rounded), losses(full)
  print(json.dumps(dict(
      batch=a.batch, dim=a.dim, scale=a.scale,
      bf16_inputs_logit_abs_err_mean=float(err.mean()), bf16_inputs_logit_abs_err_max=float(err.max()),
      f32_logit_abs_err_max=float(err32.max()),
      **{f'{k}_loss_rel_change': abs(l_round[k] - l_full[k]) / abs(l_full[k]) for k in l_full})))


if __name__ == '__main__':
  jax.config.update('jax_enable_x64', True)
  main()
