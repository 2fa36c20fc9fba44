"""The 'ring' impl: exact row losses in O(b) memory per device (the Inf-CL idea, in JAX).

Each device keeps its b local rows. The other modality's embeddings travel around the ring
of batch shards by `ppermute`, one b-row block per step; the next block is sent before the
current one is scored, so the transfer overlaps the compute. Within a device, rows and
columns are tiled to `chunk`, so at most one chunk x chunk tile of logits exists at once,
and each tile is folded into running per-row statistics (an online log-sum-exp, or a sum;
see `rows.RowLoss`). A `custom_vjp` recomputes the tiles in the backward pass: a block's
gradient travels with the block and is home after a full turn of the ring. Nothing of size
b x B is ever stored, so memory is a few b x D buffers plus a tile, whatever the batch.

Costs: the backward pass recomputes the logits (4 matmuls per tile instead of 3).
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp

from mmcl.losses.rows import RowLoss


def tile_size(b: int, chunk: int) -> int:
  """The largest divisor of the local batch `b` that is at most `chunk`."""
  if chunk < 2:
    raise ValueError(f'Ring loss chunk must be >= 2, got {chunk}.')
  size = next(t for t in range(min(chunk, b), 0, -1) if b % t == 0)
  if size < 2 and b > 1:
    raise ValueError(f'The local batch {b} has no divisor in [2, chunk={chunk}]; pick a '
                     'batch whose per-device share has a small factor, or a larger chunk.')
  return size


def _fold(kinds, acc, new):
  return {k: jnp.logaddexp(acc[k], new[k]) if kinds[k] == 'lse' else acc[k] + new[k]
          for k in kinds}


def _slice(x, i, t):
  return lax.dynamic_slice_in_dim(x, i * t, t)


def _add_at(x, i, t, dx):
  return lax.dynamic_update_slice_in_dim(x, _slice(x, i, t) + dx, i * t, 0)


def _tile_stats(spec, q_txD, k_txD, scale, bias, pos_t, is_pos_txt):
  return spec.stats(spec.logits(q_txD, k_txD, scale, bias), is_pos_txt, pos_t[:, None])


def _is_pos(row0, col0, t):
  return (row0 + jnp.arange(t))[:, None] == (col0 + jnp.arange(t))[None, :]


def _block_stats(spec, t, q_bxD, k_bxD, scale, bias, pos_b, row0, col0, acc):
  """Folds every tile of (local rows) x (one column block) into the per-row stats `acc`."""
  n = q_bxD.shape[0] // t

  def row_tile(i, acc):
    q_txD, pos_t = _slice(q_bxD, i, t), _slice(pos_b, i, t)

    def col_tile(j, acc_t):
      stats = _tile_stats(spec, q_txD, _slice(k_bxD, j, t), scale, bias, pos_t,
                          _is_pos(row0 + i * t, col0 + j * t, t))
      return _fold(spec.kinds, acc_t, stats)

    acc_t = lax.fori_loop(0, n, col_tile, {k: _slice(v, i, t) for k, v in acc.items()})
    return {k: lax.dynamic_update_slice_in_dim(acc[k], acc_t[k], i * t, 0) for k in acc}

  return lax.fori_loop(0, n, row_tile, acc)


def _block_grads(spec, t, q_bxD, k_bxD, scale, bias, pos_b, row0, col0, total, g, carry):
  """Adds one column block's tiles to (dq, dk_block, dscale, dbias, dpos)."""
  n = q_bxD.shape[0] // t

  def row_tile(i, carry):
    dq, dk, dscale, dbias, dpos = carry
    q_txD, pos_t = _slice(q_bxD, i, t), _slice(pos_b, i, t)
    total_t = {k: _slice(v, i, t) for k, v in total.items()}
    g_t = {k: _slice(v, i, t) for k, v in g.items()}

    def col_tile(j, carry):
      dq_t, dk, dscale, dbias, dpos_t = carry
      tile_fn = functools.partial(_tile_stats, spec,
                                  is_pos_txt=_is_pos(row0 + i * t, col0 + j * t, t))
      stats, vjp = jax.vjp(tile_fn, q_txD, _slice(k_bxD, j, t), scale, bias, pos_t)
      # d(row stat)/d(tile stat): 1 for a sum, the tile's softmax weight for a log-sum-exp.
      ct = {k: g_t[k] * (jnp.exp(stats[k] - total_t[k]) if kind == 'lse' else 1.0)
            for k, kind in spec.kinds.items()}
      gq, gk, gscale, gbias, gpos = vjp(ct)
      return dq_t + gq, _add_at(dk, j, t, gk), dscale + gscale, dbias + gbias, dpos_t + gpos

    init = (jnp.zeros_like(q_txD), dk, dscale, dbias, jnp.zeros_like(pos_t))
    dq_t, dk, dscale, dbias, dpos_t = lax.fori_loop(0, n, col_tile, init)
    return _add_at(dq, i, t, dq_t), dk, dscale, dbias, _add_at(dpos, i, t, dpos_t)

  return lax.fori_loop(0, n, row_tile, carry)


def ring_row_stats(spec: RowLoss, q_bxD, k_bxD, scale, bias, pos_b, *,
                   axis_names: tuple[str, ...], chunk: int) -> dict[str, jax.Array]:
  """Per-row statistics of the local rows `q` against ALL rows of `k` (every device's).

  Runs inside `shard_map` over `axis_names` (or on one device when empty). Differentiable
  in q, k, scale, bias and pos_b by a custom VJP that recomputes tiles.
  """
  b = q_bxD.shape[0]
  t = tile_size(b, chunk)
  n = lax.axis_size(axis_names) if axis_names else 1
  perm = [(i, (i + 1) % n) for i in range(n)]

  def shift(x):
    return lax.ppermute(x, axis_names, perm) if n > 1 else x

  # Traced inside fwd and bwd: a custom_vjp may not close over tracers.
  def my_index():
    return lax.axis_index(axis_names) if axis_names else 0

  def src_offset(me, s):  # After s shifts this device holds the block of shard me - s.
    return ((me - s) % n) * b

  def forward(q, k, scale, bias, pos):
    me = my_index()
    # full_like(q[:, 0]) keeps q's per-device type, as the loop carry must inside shard_map.
    init = {name: jnp.full_like(q[:, 0], -jnp.inf if kind == 'lse' else 0.0)
            for name, kind in spec.kinds.items()}

    def step(s, carry):
      block, acc = carry
      nxt = shift(block)  # In flight while `block` is scored.
      return nxt, _block_stats(spec, t, q, block, scale, bias, pos, me * b, src_offset(me, s),
                               acc)

    block, acc = lax.fori_loop(0, n - 1, step, (k, init))
    return _block_stats(spec, t, q, block, scale, bias, pos, me * b, src_offset(me, n - 1), acc)

  @jax.custom_vjp
  def stats_fn(q, k, scale, bias, pos):
    return forward(q, k, scale, bias, pos)

  def fwd(q, k, scale, bias, pos):
    total = forward(q, k, scale, bias, pos)
    return total, (q, k, scale, bias, pos, total)

  def bwd(res, g):
    q, k, scale, bias, pos, total = res
    me = my_index()

    def step(s, carry):
      block, dblock, rest = carry
      nxt = shift(block)
      dq, dblock, dscale, dbias, dpos = _block_grads(
          spec, t, q, block, scale, bias, pos, me * b, src_offset(me, s), total, g,
          (rest[0], dblock, *rest[1:]))
      return nxt, shift(dblock), (dq, dscale, dbias, dpos)  # dblock travels with its block.

    zeros = (jnp.zeros_like(q), jnp.zeros_like(scale), jnp.zeros_like(bias),
             jnp.zeros_like(pos))
    _, dk, (dq, dscale, dbias, dpos) = lax.fori_loop(
        0, n, step, (k, jnp.zeros_like(k), zeros))
    return dq, dk, dscale, dbias, dpos

  stats_fn.defvjp(fwd, bwd)
  bias = jnp.zeros((), scale.dtype) if bias is None else bias
  if axis_names:  # Replicated scalars become per-device inputs; their grads are psum'd back.
    scale, bias = (lax.pcast(x, axis_names, to='varying') for x in (scale, bias))
  return stats_fn(q_bxD, k_bxD, scale, bias, pos_b)
