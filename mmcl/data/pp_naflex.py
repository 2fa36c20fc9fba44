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
import re

import tensorflow as tf

from mmcl.data import preprocess as pp
from mmcl.data.preprocess import register_op

# The batch keys of a NaFlex image besides the patches themselves (data[key]).
ROWS, COLS, MASK, GRID = 'patch_rows', 'patch_cols', 'patch_mask', 'patch_grid'
KEYS = (ROWS, COLS, MASK, GRID)


def grid_for(hw, budget, max_budget: int | None = None):
  """int32 (h, w): the patch grid of the largest scale s of an (H, W) image with
  ceil(H s / p) * ceil(W s / p) <= budget (each side at least one patch; the grid does not
  depend on p). `budget` may be a tensor when the static `max_budget` bounds it."""
  hw = tf.cast(hw, tf.int64)
  k = tf.range(1, (max_budget or budget) + 1, dtype=tf.int64)
  budget = tf.cast(budget, tf.int64)
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
def _patchify_naflex(patch_size, budget, key='image', method='bilinear', antialias=True,
                     draw=None):
  """data[key] ([H, W, C], any value range) -> its NaFlex patches and positions (above).

  draw: budgets (each <= budget) of which each example draws one uniformly (needs _seed),
  its grid chosen for that one, padded to `budget`: one compiled step trains at several
  sequence lengths (the shapes stay [budget, ...]; the cost is that of `budget`).
  """
  ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  for name, v in (('patch_size', patch_size), ('budget', budget)):
    if not ok(v):
      raise ValueError(f'patchify_naflex: {name} must be a positive int, got {v!r}.')
  if draw is not None and (not isinstance(draw, (tuple, list)) or not draw or
                           not all(ok(v) and v <= budget for v in draw)):
    raise ValueError(f'patchify_naflex: draw must be a non-empty tuple of budgets in '
                     f'[1, budget={budget}], got {draw!r}.')
  pp.check_method(method)
  (key,) = pp.check_keys(key)

  def _op(data):
    data = dict(data)
    image = pp.get(data, key, 'patchify_naflex')
    this = budget
    if draw is not None:
      i = tf.random.stateless_uniform([], pp.next_seed(data, 'patchify_naflex'), 0, len(draw),
                                      tf.int32)
      this = tf.gather(tf.constant(draw, tf.int32), i)
    out = patchify(image, grid_for(tf.shape(image)[:2], this, budget), patch_size, budget,
                   method, antialias)
    data[key] = out.pop('patches')
    data.update(out)
    return data

  return _op


def pp_suffix(patch_size: int, budget: int, draw=None) -> str:
  """What a pp string gets appended to yield NaFlex patches (after its keep(), if any)."""
  draw = f', draw={tuple(int(b) for b in draw)}' if draw else ''
  return f'|patchify_naflex({int(patch_size)}, {int(budget)}{draw})'


_TRAILING_KEEP = re.compile(r'\|\s*keep\(([^()]*)\)\s*$')


def with_patchify(pp: str, patch_size: int, budget: int, draw=None) -> str:
  """`pp` yielding NaFlex patches: the op goes before a trailing keep(...), which also keeps
  the patch keys (a drawn budget needs the '_seed' that keep drops), else at the end."""
  op = pp_suffix(patch_size, budget, draw)
  match = _TRAILING_KEEP.search(pp)
  if not match:
    return pp + op
  keys = ', '.join(f'"{k}"' for k in KEYS)
  return f'{pp[:match.start()]}{op}|keep({match.group(1)}, {keys})'
