"""NaFlex input (SigLIP 2): an image at its own aspect ratio as up to `budget` patches.

`patchify_naflex(patch_size, budget)` resizes the image to the largest (h*p, w*p) whose
grid fits, h * w <= budget, keeping the aspect ratio within one patch, and replaces
data[key] by its patches [budget, p*p*3] (row-major grid order, each patch flattened as
(row, col, channel): the ViT's conv kernel reshaped to [p*p*3, D] embeds it), zero padded;
it adds `patch_rows` / `patch_cols` (int32 [budget], -1 on padding), `patch_mask` (bool
[budget]) and `patch_grid` (int32 [2], (h, w)). The grid is the one of the largest scale
s with ceil(H s / p) * ceil(W s / p) <= budget (SigLIP 2's rule), found exactly: the grid
only changes where H s / p or W s / p crosses an integer, so those scales are the
candidates.
"""
import tensorflow as tf

from mmcl.data import preprocess as pp
from mmcl.data.preprocess import register_op

# The batch keys of a NaFlex image besides the patches themselves (data[key]).
ROWS, COLS, MASK, GRID = 'patch_rows', 'patch_cols', 'patch_mask', 'patch_grid'
KEYS = (ROWS, COLS, MASK, GRID)


def grid_for(hw, patch_size: int, budget: int):
  """int32 (h, w): the patch grid of the largest scale s of an (H, W) image with
  ceil(H s / p) * ceil(W s / p) <= budget (each side at least one patch)."""
  hw = tf.cast(hw, tf.int64)
  k = tf.range(1, budget + 1, dtype=tf.int64)
  out = []
  for a, b in ((0, 1), (1, 0)):  # Scales s = k p / H (rows = k), then s = k p / W.
    side, other = k, tf.maximum((hw[b] * k + hw[a] - 1) // hw[a], 1)  # ceil(W k / H).
    fits = side * other <= budget
    out.append((fits, k, hw[a], side if a == 0 else other, other if a == 0 else side))
  fits = tf.concat([o[0] for o in out], 0)
  # Compare the scales k / H as fractions (exact): the largest k * (H W / H).
  scale = tf.concat([o[1] * (hw[0] * hw[1] // o[2]) for o in out], 0)
  rows = tf.concat([o[3] for o in out], 0)
  cols = tf.concat([o[4] for o in out], 0)
  best = tf.argmax(tf.where(fits, scale, -1))
  return tf.cast(tf.stack([rows[best], cols[best]]), tf.int32)


def patchify(image, grid, patch_size: int, budget: int, method: str = 'bilinear',
             antialias: bool = True) -> dict:
  """{'patches': float32 [budget, p*p*C], ROWS, COLS, MASK, GRID} of one [H, W, C] image."""
  p = patch_size
  h, w = grid[0], grid[1]
  c = image.shape[-1]
  resized = pp.resize(image, tf.stack([h * p, w * p]), method, antialias)
  patches = tf.reshape(resized, [h, p, w, p, c])
  patches = tf.reshape(tf.transpose(patches, [0, 2, 1, 3, 4]), [h * w, p * p * c])
  n = h * w
  patches = tf.pad(patches, [[0, budget - n], [0, 0]])
  patches.set_shape([budget, p * p * c])
  index = tf.range(budget, dtype=tf.int32)
  valid = index < n
  return {'patches': patches, ROWS: tf.where(valid, index // w, -1),
          COLS: tf.where(valid, index % w, -1), MASK: valid, GRID: grid}


@register_op('patchify_naflex')
def _patchify_naflex(patch_size, budget, key='image', method='bilinear', antialias=True):
  """data[key] ([H, W, C], any value range) -> its NaFlex patches and positions (above)."""
  for name, v in (('patch_size', patch_size), ('budget', budget)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f'patchify_naflex: {name} must be a positive int, got {v!r}.')
  pp.check_method(method)
  (key,) = pp.check_keys(key)

  def _op(data):
    data = dict(data)
    image = pp.get(data, key, 'patchify_naflex')
    out = patchify(image, grid_for(tf.shape(image)[:2], patch_size, budget), patch_size,
                   budget, method, antialias)
    data[key] = out.pop('patches')
    data.update(out)
    return data

  return _op


def pp_suffix(patch_size: int, budget: int) -> str:
  """What a pp string gets appended to yield NaFlex patches (after its keep(), if any)."""
  return f'|patchify_naflex({int(patch_size)}, {int(budget)})'
