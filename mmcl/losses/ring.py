"""The 'ring' impl: exact row losses in O(b) memory per device (the Inf-CL idea, in JAX).

Each device keeps its b local image rows. The text embeddings travel around the ring of
batch shards by `ppermute`, one b-row block per step; the next block is sent before the
current one is scored, so the transfer overlaps the compute. Within a device, rows and
columns are tiled to `chunk`, so at most one chunk x chunk tile of logits exists at once,
and each tile is folded into running per-row statistics (an online log-sum-exp, or a sum;
see `rows.RowLoss`). A tile serves both directions: its rows update the local image rows'
statistics (i2t), its columns update the statistics of the visiting text rows (t2i), which
travel with their block and are home after a full turn. A `custom_vjp` recomputes each tile
in the backward pass; a block's gradient travels with it the same way. Nothing of size
b x B is ever stored: memory is a few b x D buffers plus a tile, whatever the batch.

Cost per tile: one logits matmul forward, one recomputed plus two gradient matmuls backward,
for both directions together (the gather impl does three per direction).
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp

from mmcl.losses import registry

# How many times ring_stats has been traced: `distributed.make_loss_fn` checks that a loss
# run with impl='ring' really took this path (a loss that claims 'ring' but computes its
# logits some other way would otherwise silently run the gather path's memory).
_traces = 0


def traces() -> int:
  return _traces


def tile_size(b: int, chunk: int) -> int:
  """The largest divisor of the local batch `b` that is at most `chunk`."""
  if chunk < 2:
    raise ValueError(f'Ring loss chunk must be >= 2, got {chunk}.')
  size = next(t for t in range(min(chunk, b), 0, -1) if b % t == 0)
  if size < 2 and b > 1:
    raise ValueError(f'The local batch {b} has no divisor in [2, chunk={chunk}]; pick a '
                     'batch whose per-device share has a small factor, or a larger chunk.')
  return size


def _slice(x, i, t):
  return lax.dynamic_slice_in_dim(x, i * t, t)


def _put(x, i, t, x_t):
  return lax.dynamic_update_slice_in_dim(x, x_t, i * t, 0)


def _fold(kinds, acc, new):
  return {k: jnp.logaddexp(acc[k], new[k]) if kinds[k] == 'lse' else acc[k] + new[k]
          for k in acc}


def _tile(spec, is_pos_txt, q_txD, k_txD, scale, bias, pos_q_t, pos_k_t):
  """(row stats of the tile's q rows, column stats of its k rows; {} if not symmetric)."""
  logits_txt = spec.logits(q_txD, k_txD, scale, bias)
  rows = spec.stats(logits_txt, is_pos_txt, pos_q_t[:, None])
  cols = spec.stats(logits_txt.T, is_pos_txt.T, pos_k_t[:, None]) if spec.symmetric else {}
  return rows, cols


def _tile_cotangent(spec, g_t, stats_t, total_t):
  """d(loss)/d(tile stat): the row's cotangent, times the tile's share for a log-sum-exp."""
  return {k: g_t[k] * (jnp.exp(stats_t[k] - total_t[k]) if spec.kinds[k] == 'lse' else 1.0)
          for k in stats_t}


def _sliced(tree, i, t):
  return jax.tree.map(lambda x: _slice(x, i, t), tree)


def ring_stats(spec, q_bxD, k_bxD, scale, bias, pos_b, *,
               axis_names: tuple[str, ...], chunk: int):
  """(stats of the local q rows vs ALL k rows, stats of the local k rows vs ALL q rows).

  The second is {} unless `spec.symmetric`. Runs inside `shard_map` over `axis_names` (or
  on one device when empty). `spec` is a `rows.RowLoss`; `pos_b` holds each local pair's
  logit. Differentiable in all array arguments by a custom VJP that recomputes the tiles.
  """
  global _traces
  _traces += 1
  b = q_bxD.shape[0]
  t = tile_size(b, chunk)
  n_tiles = b // t
  n = lax.axis_size(axis_names) if axis_names else 1
  perm = [(i, (i + 1) % n) for i in range(n)]

  def shift(tree):
    return jax.tree.map(lambda x: lax.ppermute(x, axis_names, perm), tree) if n > 1 else tree

  def my_index():  # Traced inside fwd and bwd: a custom_vjp may not close over tracers.
    return lax.axis_index(axis_names) if axis_names else 0

  def src_offset(me, s):  # After s shifts this device holds the block of shard me - s.
    return ((me - s) % n) * b

  def is_pos(me, s, i, j):
    return ((me * b + i * t + jnp.arange(t))[:, None]
            == (src_offset(me, s) + j * t + jnp.arange(t))[None, :])

  def block_forward(me, s, q, block, pos_block, scale, bias, pos, row_acc, col_acc):
    def row_tile(i, carry):
      row_acc, col_acc = carry

      def col_tile(j, carry):
        row_acc_t, col_acc = carry
        rows, cols = _tile(spec, is_pos(me, s, i, j), _slice(q, i, t), _slice(block, j, t),
                           scale, bias, _slice(pos, i, t), _slice(pos_block, j, t))
        col_acc_t = _fold(spec.kinds, _sliced(col_acc, j, t), cols)
        return (_fold(spec.kinds, row_acc_t, rows),
                {k: _put(v, j, t, col_acc_t[k]) for k, v in col_acc.items()})

      row_acc_t, col_acc = lax.fori_loop(0, n_tiles, col_tile,
                                         (_sliced(row_acc, i, t), col_acc))
      return {k: _put(v, i, t, row_acc_t[k]) for k, v in row_acc.items()}, col_acc

    return lax.fori_loop(0, n_tiles, row_tile, (row_acc, col_acc))

  def forward(q, k, scale, bias, pos):
    me = my_index()
    # full_like(q[:, 0]) keeps q's per-device type, as loop carries must inside shard_map.
    init = {name: jnp.full_like(q[:, 0], -jnp.inf if kind == 'lse' else 0.0)
            for name, kind in spec.kinds.items()}

    def step(s, carry):
      block, pos_block, col_acc, row_acc = carry
      nxt = shift((block, pos_block))  # In flight while `block` is scored.
      row_acc, col_acc = block_forward(me, s, q, block, pos_block, scale, bias, pos,
                                       row_acc, col_acc)
      return (*nxt, shift(col_acc), row_acc)  # Column stats travel with their block.

    col_init = init if spec.symmetric else {}
    _, _, col_acc, row_acc = lax.fori_loop(0, n, step, (k, pos, col_init, init))
    return row_acc, col_acc

  def block_backward(me, s, q, pos, row_total, g_row, scale, bias, travelling, carry):
    block, pos_block, col_total, g_col, dblock, dpos_block = travelling

    def row_tile(i, carry):
      dq, dpos, dscale, dbias, dblock, dpos_block = carry
      q_t, pos_t = _slice(q, i, t), _slice(pos, i, t)
      row_total_t, g_row_t = _sliced(row_total, i, t), _sliced(g_row, i, t)

      def col_tile(j, carry):
        dq_t, dpos_t, dscale, dbias, dblock, dpos_block = carry
        (rows, cols), vjp = jax.vjp(functools.partial(_tile, spec, is_pos(me, s, i, j)),
                                    q_t, _slice(block, j, t), scale, bias, pos_t,
                                    _slice(pos_block, j, t))
        gq, gk, gscale, gbias, gpos, gpos_k = vjp((
            _tile_cotangent(spec, g_row_t, rows, row_total_t),
            _tile_cotangent(spec, _sliced(g_col, j, t), cols, _sliced(col_total, j, t))))
        return (dq_t + gq, dpos_t + gpos, dscale + gscale, dbias + gbias,
                _put(dblock, j, t, _slice(dblock, j, t) + gk),
                _put(dpos_block, j, t, _slice(dpos_block, j, t) + gpos_k))

      init = (jnp.zeros_like(q_t), jnp.zeros_like(pos_t), dscale, dbias, dblock, dpos_block)
      dq_t, dpos_t, dscale, dbias, dblock, dpos_block = lax.fori_loop(
          0, n_tiles, col_tile, init)
      return (_put(dq, i, t, _slice(dq, i, t) + dq_t),
              _put(dpos, i, t, _slice(dpos, i, t) + dpos_t), dscale, dbias, dblock, dpos_block)

    return lax.fori_loop(0, n_tiles, row_tile, (*carry, dblock, dpos_block))

  @jax.custom_vjp
  def stats_fn(q, k, scale, bias, pos):
    return forward(q, k, scale, bias, pos)

  def fwd(q, k, scale, bias, pos):
    totals = forward(q, k, scale, bias, pos)
    return totals, (q, k, scale, bias, pos, totals)

  @registry.loss_precision
  def bwd(res, g):
    q, k, scale, bias, pos, (row_total, col_total) = res
    g_row, g_col = g
    me = my_index()

    def step(s, carry):
      travelling, local = carry
      block, pos_block, col_total_b, g_col_b, _, _ = travelling
      nxt = shift((block, pos_block, col_total_b, g_col_b))
      dq, dpos, dscale, dbias, dblock, dpos_block = block_backward(
          me, s, q, pos, row_total, g_row, scale, bias, travelling, local)
      # The block's gradient travels with it: home after n steps.
      return (*nxt, *shift((dblock, dpos_block))), (dq, dpos, dscale, dbias)

    travelling = (k, pos, col_total, g_col, jnp.zeros_like(k), jnp.zeros_like(pos))
    local = (jnp.zeros_like(q), jnp.zeros_like(pos), jnp.zeros_like(scale),
             jnp.zeros_like(bias))
    travelling, (dq, dpos, dscale, dbias) = lax.fori_loop(0, n, step, (travelling, local))
    dk, dpos_home = travelling[4], travelling[5]
    return dq, dk, dscale, dbias, dpos + dpos_home

  stats_fn.defvjp(fwd, bwd)
  bias = jnp.zeros((), scale.dtype) if bias is None else bias
  if axis_names:  # Replicated scalars become per-device inputs; their grads are psum'd back.
    scale, bias = (lax.pcast(x, axis_names, to='varying') for x in (scale, bias))
  return stats_fn(q_bxD, k_bxD, scale, bias, pos_b)
