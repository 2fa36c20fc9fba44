"""Gradient accumulation that keeps every negative (GradCache).

Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup". A contrastive loss couples every row with every other, so summing the
gradients of k independent micro-batch losses would silently drop the negatives between
micro-batches. Instead:
  1. embed each of the k micro-batches without keeping activations;
  2. compute the loss and its gradient w.r.t. the embeddings on the full global batch;
  3. re-run each micro-batch and back-propagate its slice of those embedding gradients.
The parameter gradient equals the full-batch gradient; activation memory is that of one
micro-batch, at the price of a second forward pass. Micro-batch m holds rows m, m + k,
m + 2k, ... so that every device keeps an equal share of each micro-batch.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def split(x, k: int, sharding: NamedSharding):
  """[B, ...] -> [k, B/k, ...]; row m + k r goes to micro-batch m, position r."""
  x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  spec = P(None, *sharding.spec)
  return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


def _merge(x, sharding: NamedSharding):
  """Inverse of `_split`: [k, B/k, ...] -> [B, ...] in the original row order."""
  x = jnp.swapaxes(x, 0, 1)
  x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  return jax.lax.with_sharding_constraint(x, sharding)


def value_and_grad(params, batch: dict, *, embed: Callable, loss: Callable, accum_steps: int,
                   rng, batch_sharding: NamedSharding):
  """GradCache's (value, aux), grads; the same as the full-batch `value_and_grad`.

  embed(params, batch, rng) -> (zimg, ztxt, heads, aux_loss, metrics): `heads` holds the
    per-batch scalars the loss reads (temperature, bias); `aux_loss` a per-batch loss that
    is averaged over the micro-batches (e.g. MoE balancing), `metrics` likewise.
  loss(zimg, ztxt, heads) -> (loss, loss_metrics), on the full global batch.
  Returns ((total, (loss, loss_metrics, heads, metrics)), grads).
  """
  k = accum_steps
  micro = jax.tree.map(lambda x: split(x, k, batch_sharding), batch)
  micro_rngs = jax.random.split(rng, k)

  def embed_one(inputs):
    mb, r = inputs
    return embed(params, mb, r)

  # 1. Embeddings of every micro-batch; lax.map keeps one micro-batch's activations alive.
  zimg, ztxt, heads, aux, metrics = jax.lax.map(embed_one, (micro, micro_rngs))
  heads = jax.tree.map(lambda x: x[0], heads)  # Equal across micro-batches.
  aux, metrics = jnp.mean(aux), jax.tree.map(jnp.mean, metrics)

  # 2. Loss and embedding gradients on the whole batch: every negative is kept.
  (value, loss_metrics), (dzimg, dztxt, dheads) = jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True)(
          _merge(zimg, batch_sharding), _merge(ztxt, batch_sharding), heads)
  dzimg, dztxt = split(dzimg, k, batch_sharding), split(dztxt, k, batch_sharding)

  # 3. Back-propagate each micro-batch's slice; the heads' and aux's cotangents are split k ways.
  def backward_one(grads, inputs):
    mb, r, dzi, dzt = inputs
    _, vjp = jax.vjp(lambda p: embed(p, mb, r)[:4], params)
    scaled = jax.tree.map(lambda d: d / k, dheads)
    (g,) = vjp((dzi, dzt, scaled, jnp.asarray(1.0 / k, aux.dtype)))
    return jax.tree.map(jnp.add, grads, g), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(backward_one, zeros, (micro, micro_rngs, dzimg, dztxt))
  return (value + aux, (value, loss_metrics, heads, metrics)), grads
