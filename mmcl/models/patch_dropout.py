"""FLIP patch dropout: train on a random subset of each image's patch tokens.

Li et al. 2023, "Scaling Language-Image Pre-training via Masking" (FLIP): dropping 50-75% of
the patches "before the encoder" makes a step several times cheaper at a small accuracy cost,
recovered by an optional short unmasked phase at the end of training.

Every example keeps the same number K = round(N * (1 - ratio)) of its N tokens (at least one),
so the shapes stay static; which ones is random per example. The kept tokens stay in their
original order (the position embedding was added before, so order carries no information;
sorted indices only make the gather easier to read in a profile).
"""
import jax
import jax.numpy as jnp


def kept_count(num_tokens: int, ratio: float) -> int:
  """K = round(N * (1 - ratio)), at least 1: the tokens each example keeps."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'patch_dropout={ratio} must be in [0, 1).')
  return max(1, int(round(num_tokens * (1.0 - ratio))))


def keep_indices(rng, batch: int, num_tokens: int, keep: int):
  """[batch, keep] int32: per row, `keep` distinct token indices drawn uniformly, sorted."""
  noise_BxN = jax.random.uniform(rng, (batch, num_tokens))
  # The K smallest of N iid uniforms are a uniform random K-subset.
  _, idx_BxK = jax.lax.top_k(-noise_BxN, keep)
  return jnp.sort(idx_BxK, axis=1).astype(jnp.int32)


def drop_patches(x_BxNxD, ratio: float, rng):
  """x_BxKxD: each row's kept tokens (see the module docstring); ratio 0 returns x itself."""
  if ratio == 0.0:
    return x_BxNxD
  b, n, _ = x_BxNxD.shape
  idx_BxK = keep_indices(rng, b, n, kept_count(n, ratio))
  return jnp.take_along_axis(x_BxNxD, idx_BxK[:, :, None], axis=1)
