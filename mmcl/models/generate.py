"""Greedy and beam-search decoding with a fixed-length buffer: jit-friendly, no retracing.

`logits_fn(inputs_NxL) -> logits_NxLxV` is a teacher-forced decoder (e.g. TextDecoder applied
to one batch of image tokens). Each step reruns it over the whole buffer and reads position t
(no key/value cache: L times the work of a cached decoder, which at caption lengths is cheap
next to writing one; a cache is the next optimisation). Row b's buffer holds its prompt at
positions < start_b; tokens are written at positions start_b <= t < stop_b until EOS, and
everything after stays pad (0). Pad is never generated. `token_mask_V` (bool) restricts what
may be generated, e.g. to the location tokens of a box.
"""
import jax
import jax.numpy as jnp

from mmcl.models.decoder import PAD_ID, shift_right

NEG_INF = -1e30  # Finite: -inf - -inf would be NaN in the beam bookkeeping.


def _log_probs(logits_NxV, token_mask_V):
  logits_NxV = logits_NxV.astype(jnp.float32).at[:, PAD_ID].set(NEG_INF)
  if token_mask_V is not None:
    logits_NxV = jnp.where(token_mask_V[None], logits_NxV, NEG_INF)
  return jax.nn.log_softmax(logits_NxV, axis=-1)


def greedy(logits_fn, prompt_BxL, start_B, *, eos_id: int, stop_B=None, token_mask_V=None):
  """The most likely next token at every step: the filled buffer [B, L] (int32)."""
  b, l = prompt_BxL.shape
  stop_B = jnp.full((b,), l) if stop_B is None else stop_B

  def step(t, carry):
    seq_BxL, done_B = carry
    logp_BxV = _log_probs(logits_fn(shift_right(seq_BxL))[:, t], token_mask_V)
    token_B = jnp.argmax(logp_BxV, axis=-1).astype(seq_BxL.dtype)
    write_B = (t >= start_B) & (t < stop_B) & ~done_B
    seq_BxL = seq_BxL.at[:, t].set(jnp.where(write_B, token_B, seq_BxL[:, t]))
    return seq_BxL, done_B | (write_B & (token_B == eos_id))

  seq_BxL, _ = jax.lax.fori_loop(0, l, step, (prompt_BxL, jnp.zeros((b,), jnp.bool_)))
  return seq_BxL


def beam_search(logits_fn, prompt_BxL, start_B, *, eos_id: int, beam: int, stop_B=None,
                token_mask_V=None):
  """(best buffer [B, L], its log-probability [B]) of a beam of `beam` hypotheses per row.

  A hypothesis' score is the sum of its generated tokens' log-probabilities (EOS included;
  no length penalty). A finished hypothesis (EOS, or past stop) keeps its score and competes
  with the open ones, so with a beam as wide as the number of hypotheses this is an exact
  search (tests/test_decoder.py checks it against an exhaustive one).
  """
  b, l = prompt_BxL.shape
  k = beam
  stop_B = jnp.full((b,), l) if stop_B is None else stop_B
  seq_BxKxL = jnp.repeat(prompt_BxL[:, None], k, axis=1)
  # One live hypothesis at first; the others start at -inf so the first expansion fills
  # the beam with distinct continuations.
  score_BxK = jnp.where(jnp.arange(k)[None] == 0, 0.0, NEG_INF) * jnp.ones((b, 1))
  done_BxK = jnp.zeros((b, k), jnp.bool_)

  def step(t, carry):
    seq_BxKxL, score_BxK, done_BxK = carry
    logits = logits_fn(shift_right(seq_BxKxL.reshape(b * k, l)))[:, t]
    v = logits.shape[-1]
    logp_BxKxV = _log_probs(logits, token_mask_V).reshape(b, k, v)
    # A hypothesis not written at t (prompt, finished, past stop) has one continuation:
    # itself, at no cost (candidate index 0, its token left as it is).
    keep_BxK = done_BxK | ~((t >= start_B) & (t < stop_B))[:, None]
    kept = jnp.where(jnp.arange(v) == 0, score_BxK[..., None], NEG_INF)
    cand_BxKxV = jnp.where(keep_BxK[..., None], kept, score_BxK[..., None] + logp_BxKxV)
    score_BxK, idx_BxK = jax.lax.top_k(cand_BxKxV.reshape(b, k * v), k)
    parent_BxK, token_BxK = idx_BxK // v, (idx_BxK % v).astype(seq_BxKxL.dtype)
    seq_BxKxL = jnp.take_along_axis(seq_BxKxL, parent_BxK[..., None], axis=1)
    kept_BxK = jnp.take_along_axis(keep_BxK, parent_BxK, axis=1)
    token_BxK = jnp.where(kept_BxK, seq_BxKxL[:, :, t], token_BxK)
    seq_BxKxL = seq_BxKxL.at[:, :, t].set(token_BxK)
    done_BxK = jnp.take_along_axis(done_BxK, parent_BxK, axis=1) | (
        ~kept_BxK & (token_BxK == eos_id))
    return seq_BxKxL, score_BxK, done_BxK

  seq_BxKxL, score_BxK, _ = jax.lax.fori_loop(0, l, step, (seq_BxKxL, score_BxK, done_BxK))
  best_B = jnp.argmax(score_BxK, axis=1)
  return (jnp.take_along_axis(seq_BxKxL, best_B[:, None, None], axis=1)[:, 0],
          jnp.take_along_axis(score_BxK, best_B[:, None], axis=1)[:, 0])
