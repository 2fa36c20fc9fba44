"""Stub towers and image writers for the file-based benchmark tests (compositionality, XM3600).

Images are solid patches of palette colours; the stub image tower maps an image's mean colour
to the nearest palette entry and that entry to a chosen embedding, so the expected embedding
of every image (or crop) is known without running the pp pipeline. The stub text tower is a
position-dependent random table over token ids, recomputed in float64 numpy for references.
"""
import itertools

import jax.numpy as jnp
import numpy as np
from PIL import Image

from test_evaluate import StubModel

# 27 colours at least 95 apart in every differing channel: JPEG noise cannot move a mean
# colour to another entry.
PALETTE = np.array(list(itertools.product((30, 128, 225), repeat=3)), np.float32)
PP = 'decode|resize(16)|value_range(-1, 1)'


def write_image(path, color: int, size=(20, 14), patches=()):
  """A solid `color` image of size (w, h); patches: ((x0, y0, x1, y1), color) on top."""
  w, h = size
  pixels = np.broadcast_to(PALETTE[color], (h, w, 3)).copy()
  for (x0, y0, x1, y1), c in patches:
    pixels[y0:y1, x0:x1] = PALETTE[c]
  path.parent.mkdir(parents=True, exist_ok=True)
  kw = dict(quality=95) if path.suffix == '.jpg' else {}
  Image.fromarray(pixels.astype(np.uint8)).save(path, **kw)


def normalized(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Towers:
  """Stub model plus the float64 reference embeddings it should produce."""

  def __init__(self, vocab: int, text_len: int, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.image_emb = rng.normal(size=(len(PALETTE), d)).astype(np.float32)
    self.table = rng.normal(size=(text_len, vocab, d)).astype(np.float32)
    palette, image_emb, table = map(jnp.asarray, (PALETTE, self.image_emb, self.table))

    def image_fn(images):
      mean = (images.astype(jnp.float32).mean(axis=(1, 2)) + 1.0) * 127.5
      nearest = jnp.argmin(jnp.sum(jnp.square(mean[:, None] - palette[None]), -1), axis=1)
      return image_emb[nearest]

    def text_fn(tokens):
      rows = table[jnp.arange(tokens.shape[1])[None, :], tokens]  # [B, L, D]
      return jnp.sum(rows * (tokens != 0)[..., None].astype(jnp.float32), axis=1)

    self.model = StubModel(image_fn=image_fn, text_fn=text_fn)

  def image(self, color: int) -> np.ndarray:
    return normalized(self.image_emb[color])

  def texts(self, token_rows) -> np.ndarray:
    """[N, D] float64 reference text embeddings of int token rows [N, L]."""
    out = []
    for row in np.asarray(token_rows):
      out.append(sum((self.table[l, t].astype(np.float64) for l, t in enumerate(row) if t),
                     np.zeros(self.table.shape[-1])))
    return normalized(np.stack(out))
