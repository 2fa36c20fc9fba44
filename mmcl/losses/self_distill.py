"""Self-distillation losses against an EMA teacher (SILC, TIPS; SigLIP 2 uses both).

DINO-style cross-entropy between prototype distributions (Caron et al. 2021, "Emerging
Properties in Self-Supervised Vision Transformers"): the teacher's logits are centred (a
running mean, against collapse) and sharpened by a low temperature, the student's softened
by a higher one; the student is trained to match the teacher, who gets no gradient.

- `local_to_global`: SILC ("SILC: Improving Vision Language Pretraining with
  Self-Distillation", Naeem et al. 2023): every local crop of the student predicts the
  teacher's distribution for the global view.
- `masked_prediction`: TIPS ("TIPS: Text-Image Pretraining with Spatial awareness",
  Maninis et al. 2024), after iBOT (Zhou et al. 2022): at the masked patch positions the
  student's tokens predict the teacher's tokens of the same, unmasked view; averaged over
  an image's masked tokens, then over images (iBOT's normalisation).

Pure functions of global arrays: under `jit` the compiler partitions the batch means.
"""
import jax
import jax.numpy as jnp


def teacher_probs(logits_xK, center_K, temperature: float):
  """softmax((logits - center) / temperature), no gradient (the teacher is a target)."""
  logits_xK = jax.lax.stop_gradient(logits_xK.astype(jnp.float32))
  center_xK = jnp.reshape(center_K, (1,) * (logits_xK.ndim - 1) + center_K.shape)
  return jax.nn.softmax((logits_xK - center_xK) / temperature, axis=-1)


def _cross_entropy(p_teacher_xK, student_logits_xK, temperature: float):
  """-sum_k p_k log softmax(student / temperature)_k, per row."""
  logp_xK = jax.nn.log_softmax(student_logits_xK.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(p_teacher_xK * logp_xK, axis=-1)


def local_to_global(student_BxVxK, teacher_BxK, center_K, *, student_temp: float,
                    teacher_temp: float):
  """Mean over images and the V local views of CE(teacher(global), student(view))."""
  p_Bx1xK = teacher_probs(teacher_BxK, center_K, teacher_temp)[:, None, :]
  return jnp.mean(_cross_entropy(p_Bx1xK, student_BxVxK, student_temp))


def masked_prediction(student_BxNxK, teacher_BxNxK, mask_BxN, center_K, *,
                      student_temp: float, teacher_temp: float):
  """Per image the mean CE over its masked tokens (images with none count 0), then the
  mean over images."""
  p_BxNxK = teacher_probs(teacher_BxNxK, center_K, teacher_temp)
  ce_BxN = _cross_entropy(p_BxNxK, student_BxNxK, student_temp)
  m_BxN = mask_BxN.astype(jnp.float32)
  per_image_B = jnp.sum(ce_BxN * m_BxN, axis=1) / jnp.maximum(jnp.sum(m_BxN, axis=1), 1.0)
  return jnp.mean(per_image_B)


def update_center(center_K, teacher_xK, momentum: float):
  """DINO's centre: momentum * center + (1 - momentum) * batch mean of teacher logits."""
  mean_K = jnp.mean(jnp.reshape(jax.lax.stop_gradient(teacher_xK), (-1, center_K.shape[0])),
                    axis=0)
  return momentum * center_K + (1 - momentum) * mean_K.astype(center_K.dtype)


def random_token_mask(rng, batch: int, tokens: int, ratio: float):
  """bool [batch, tokens] with exactly round(ratio * tokens) True per row, at uniformly
  random positions (SigLIP 2 masks 50% of the student's patches)."""
  if not 0 <= ratio <= 1:
    raise ValueError(f'mask ratio must be in [0, 1], got {ratio}.')
  k = int(round(ratio * tokens))
  noise_BxN = jax.random.uniform(rng, (batch, tokens))
  rank_BxN = jnp.argsort(jnp.argsort(noise_BxN, axis=1), axis=1)
  return rank_BxN < k
