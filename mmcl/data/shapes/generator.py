"""Deterministic procedural generator for the `mmcl_shapes` image-caption data.

Pure numpy (no TensorFlow). Each image shows one or two coloured shapes on a
noisy, low-contrast background and comes with several differently worded
captions. Some (colour, shape) pairs are held out of the train split so that
compositional generalisation can be measured on validation/test.

Example `i` of split `s` is drawn from `example_rng(seed, s, i)`, so any subset
of a split can be generated independently, in any order, reproducibly.
"""
import functools

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'diamond', 'heart',
          'ring')
COLORS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'cyan',
          'white')
SIZES = ('small', 'large')

# Saturated, well separated colours; the background stays grey and mid-dark.
COLOR_RGB = np.array([
    (225, 35, 35),    # red
    (40, 190, 60),    # green
    (45, 85, 240),    # blue
    (245, 225, 40),   # yellow
    (165, 55, 225),   # purple
    (255, 140, 10),   # orange
    (40, 220, 230),   # cyan
    (248, 248, 248),  # white
], dtype=np.float32)

# Diameter of an object as a fraction of the image side: (mean, jitter).
SIZE_FRACTION = ((0.3, 0.02), (0.48, 0.03))

# Position words -> (x, y) of the cell centre as a fraction of the image side.
POSITIONS = {
    'top left': (0.25, 0.25), 'top': (0.5, 0.25), 'top right': (0.75, 0.25),
    'left': (0.25, 0.5), 'center': (0.5, 0.5), 'right': (0.75, 0.5),
    'bottom left': (0.25, 0.75), 'bottom': (0.5, 0.75),
    'bottom right': (0.75, 0.75),
}
POSITION_NAMES = tuple(POSITIONS)
# Two phrasings per position, used by different caption templates.
_AT = {
    'top left': 'in the top left', 'top': 'at the top',
    'top right': 'in the top right', 'left': 'on the left',
    'center': 'in the center', 'right': 'on the right',
    'bottom left': 'in the bottom left', 'bottom': 'at the bottom',
    'bottom right': 'in the bottom right',
}
_NEAR = {
    'top left': 'in the top left corner', 'top': 'near the top',
    'top right': 'in the top right corner', 'left': 'on the left side',
    'center': 'in the middle', 'right': 'on the right side',
    'bottom left': 'in the bottom left corner', 'bottom': 'near the bottom',
    'bottom right': 'in the bottom right corner',
}

COMBO_NAMES = tuple(f'{c} {s}' for c in COLORS for s in SHAPES)

# One pair per colour and per shape (a permutation, like a Latin-square
# diagonal): never in train, present in validation/test.
HELDOUT_COMBOS = tuple(
    (COLORS[i], SHAPES[(3 * i + 2) % len(SHAPES)]) for i in range(len(COLORS)))

SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}
MAX_CAPTION_CHARS = 79
_HELDOUT_PROB = 0.25  # Share of single-object eval images with a held-out pair.
_TWO_OBJECT_PROB = 0.3
_JITTER = 0.04  # Position jitter, as a fraction of the image side.
_MAX_ROTATION = np.deg2rad(12.0)  # Small enough that a square stays a square.
_SUPERSAMPLE = 3


def combo_index(color: int, shape: int) -> int:
  """Index of a (colour index, shape index) pair in `COMBO_NAMES`."""
  return color * len(SHAPES) + shape


_HELDOUT_IDS = np.array(sorted(
    combo_index(COLORS.index(c), SHAPES.index(s)) for c, s in HELDOUT_COMBOS))
_TRAIN_IDS = np.setdiff1d(np.arange(len(COMBO_NAMES)), _HELDOUT_IDS)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator for example `index` of `split`: independent of order."""
  return np.random.default_rng([seed, SPLIT_IDS[split], index])


# --- Shapes: boolean masks in object coordinates (unit disk, y points down).


def _circle(x, y):
  return x * x + y * y <= 0.9**2


def _ring(x, y):
  r2 = x * x + y * y
  return (r2 <= 0.95**2) & (r2 >= 0.5**2)


def _square(x, y):
  return np.maximum(np.abs(x), np.abs(y)) <= 0.7


def _diamond(x, y):
  # Taller than wide, so it never looks like a slightly rotated square.
  return np.abs(x) / 0.7 + np.abs(y) <= 1.0


def _triangle(x, y):
  # Upward equilateral triangle inscribed in the unit circle, apex at top.
  return (y <= 0.5) & (np.abs(x) * np.sqrt(3.0) <= y + 1.0)


def _cross(x, y):
  ax, ay = np.abs(x), np.abs(y)
  return ((ax <= 0.3) & (ay <= 0.93)) | ((ay <= 0.3) & (ax <= 0.93))


def _star(x, y, inner=0.45):
  # Fold the angle into one half-spike, then test against the spike's edge.
  rho = np.sqrt(x * x + y * y)
  half = np.pi / 5
  phi = np.abs(np.mod(np.arctan2(x, -y) + half, 2 * half) - half)
  px, py = rho * np.cos(phi), rho * np.sin(phi)
  bx, by = inner * np.cos(half) - 1.0, inner * np.sin(half)
  return bx * py - by * (px - 1.0) >= 0


def _heart(x, y):
  # Classic implicit heart (y up), scaled and centred into the unit disk.
  hx, hy = x * 1.22, -y * 1.22 + 0.15
  q = hx * hx + hy * hy - 1.0
  return q * q * q - hx * hx * hy * hy * hy <= 0


_MASKS = {
    'circle': _circle, 'square': _square, 'triangle': _triangle,
    'star': _star, 'cross': _cross, 'diamond': _diamond, 'heart': _heart,
    'ring': _ring,
}


# --- Rendering.


@functools.lru_cache(maxsize=None)
def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
  """Linear interpolation matrix mapping n_in grid values to n_out pixels."""
  pos = np.linspace(0, n_in - 1, n_out)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  frac = (pos - lo).astype(np.float32)
  mat = np.zeros((n_out, n_in), np.float32)
  mat[np.arange(n_out), lo] = 1 - frac
  mat[np.arange(n_out), lo + 1] = frac
  return mat


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Grey, low-contrast smooth noise plus faint stripes, float [S, S, 3]."""
  grid = rng.integers(3, 7)
  up = _upsample_matrix(size, grid)
  smooth = up @ rng.normal(0, 10, (grid, grid)).astype(np.float32) @ up.T
  # sin(a*x + b*y + c) as a sum of two outer products: no [S, S] sin needed.
  angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 7)
  coords = np.arange(size) * (2 * np.pi * freq / size)
  ax = coords * np.cos(angle)
  by = coords * np.sin(angle) + rng.uniform(0, 2 * np.pi)
  stripes = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
  stripes = (rng.uniform(0, 7) * stripes).astype(np.float32)
  level = np.float32(rng.uniform(45, 95))
  tint = rng.uniform(-5, 5, 3).astype(np.float32)  # Keep it nearly grey.
  return (level + smooth + stripes)[..., None] + tint


def _draw(canvas: np.ndarray, obj: dict, rng: np.random.Generator) -> tuple:
  """Composites one anti-aliased object onto the float canvas in place; returns its tight
  box (y0, x0, y1, x1) in pixels: the pixel edges around every pixel it covers."""
  size = canvas.shape[0]
  cx, cy = obj['center']
  r = obj['diameter'] / 2
  x0, x1 = max(int(cx - r) - 1, 0), min(int(np.ceil(cx + r)) + 1, size)
  y0, y1 = max(int(cy - r) - 1, 0), min(int(np.ceil(cy + r)) + 1, size)
  k = _SUPERSAMPLE
  sub = (np.arange(k, dtype=np.float32) + 0.5) / k
  xs = ((np.arange(x0, x1, dtype=np.float32)[:, None] + sub).ravel() - cx) / r
  ys = ((np.arange(y0, y1, dtype=np.float32)[:, None] + sub).ravel() - cy) / r
  cos, sin = np.cos(obj['rotation']), np.sin(obj['rotation'])
  u = cos * xs[None, :] + sin * ys[:, None]
  v = -sin * xs[None, :] + cos * ys[:, None]
  inside = _MASKS[SHAPES[obj['shape']]](u, v)
  alpha = inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))[..., None]
  rgb = COLOR_RGB[obj['color']] + rng.uniform(-12, 12, 3).astype(np.float32)
  patch = canvas[y0:y1, x0:x1]
  patch += alpha * (rgb - patch)
  rows, cols = np.nonzero(alpha[..., 0] > 0)
  return (y0 + rows.min(), x0 + cols.min(), y0 + rows.max() + 1, x0 + cols.max() + 1)


def render(rng: np.random.Generator, objects: list, size: int, with_boxes: bool = False):
  """Draws `objects` on a fresh background; returns uint8 [size, size, 3], and with
  `with_boxes` also each object's tight box, normalised (y0, x0, y1, x1), float32 [N, 4]
  (the same random draws either way: the boxes come from the masks drawn)."""
  canvas = _background(rng, size)
  boxes = [_draw(canvas, obj, rng) for obj in objects]
  # Fine grey grain, float32 throughout for speed.
  canvas += 3 * rng.standard_normal((size, size, 1), dtype=np.float32)
  image = np.clip(canvas, 0, 255).astype(np.uint8)
  if with_boxes:
    return image, np.asarray(boxes, np.float32).reshape(-1, 4) / size
  return image


# --- Scene layout.


def _place(rng, position: str, diameter: float, size: int):
  """A jittered centre inside `position`'s cell, kept fully inside the image."""
  fx, fy = POSITIONS[position]
  r = diameter / 2 + 0.5
  cx = np.clip((fx + rng.uniform(-_JITTER, _JITTER)) * size, r, size - r)
  cy = np.clip((fy + rng.uniform(-_JITTER, _JITTER)) * size, r, size - r)
  return float(cx), float(cy)


def _sample_objects(rng, combos, size: int) -> list:
  """Sizes, positions and poses for objects with the given combo indices."""
  sizes = rng.integers(0, len(SIZES), len(combos))
  diameters = [size * (SIZE_FRACTION[s][0]
                       + rng.uniform(-1, 1) * SIZE_FRACTION[s][1])
               for s in sizes]
  for _ in range(30):  # Rejection sampling until the objects do not overlap.
    names = rng.choice(len(POSITIONS), len(combos), replace=False)
    positions = [POSITION_NAMES[n] for n in names]
    centers = [_place(rng, p, d, size) for p, d in zip(positions, diameters)]
    if len(combos) == 1 or (np.hypot(centers[0][0] - centers[1][0],
                                     centers[0][1] - centers[1][1])
                            >= (diameters[0] + diameters[1]) / 2 + 1):
      break
  else:  # Practically unreachable; opposite corners always fit.
    positions = ['top left', 'bottom right']
    centers = [_place(rng, p, d, size) for p, d in zip(positions, diameters)]
  return [dict(color=int(c // len(SHAPES)), shape=int(c % len(SHAPES)),
               size=int(s), position=p, center=ctr, diameter=float(d),
               rotation=float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)))
          for c, s, p, ctr, d in zip(combos, sizes, positions, centers,
                                     diameters)]


def _sample_combos(rng, split: str, num_objects: int) -> list:
  """Combo indices for the objects; held-out pairs never in train."""
  if split == 'train':
    return [int(c) for c in rng.choice(_TRAIN_IDS, num_objects, replace=False)]
  if num_objects == 1 and rng.uniform() < _HELDOUT_PROB:
    return [int(rng.choice(_HELDOUT_IDS))]
  return [int(c) for c in
          rng.choice(len(COMBO_NAMES), num_objects, replace=False)]


# --- Captions.


def _words(obj: dict):
  return (SIZES[obj['size']], COLORS[obj['color']], SHAPES[obj['shape']],
          obj['position'])


def _a(word: str) -> str:
  """The indefinite article for `word` ('an orange', 'a red')."""
  return 'an' if word[0] in 'aeiou' else 'a'


def captions(objects: list) -> list:
  """Differently worded captions; every one mentions every object.

  About half the captions name the shape without the position (some name nothing
  but the shape): with position and colour in every caption, a batch has few
  negatives that only shape tells apart, and contrastive training learns shape
  last and slowly.
  """
  size, color, shape, pos = _words(objects[0])
  if len(objects) == 1:
    return [
        f'a {size} {color} {shape} {_AT[pos]}',
        f'there is a {size} {color} {shape} {_NEAR[pos]}',
        f'a picture of {_a(color)} {color} {shape}',
        f'{color} {shape}, {size}, {pos}',
        f'a {size} {shape} {_AT[pos]}',
        f'something {color} {_NEAR[pos]}',
        f'{_a(color)} {color} {shape}',
        f'a {size} {shape}',
        f'a {shape}',
    ]
  size2, color2, shape2, pos2 = _words(objects[1])
  a, a2 = _a(color), _a(color2)
  return [
      f'{a} {color} {shape} {_AT[pos]} and {a2} {color2} {shape2} {_AT[pos2]}',
      (f'there is a {size} {color} {shape} {_AT[pos]} '
       f'and {a2} {color2} {shape2}'),
      f'a picture of {a} {color} {shape} and {a2} {color2} {shape2}',
      f'a {size} {color} {shape} and a {size2} {color2} {shape2}',
      f'{color} {shape}, {size}, {pos}; {color2} {shape2}, {size2}, {pos2}',
      f'{color} {shape} and {color2} {shape2}',
      f'a {shape} and a {shape2}',
  ]


# --- Public entry point.


def region_caption(obj: dict) -> str:
  """The words that single out one object of an image: 'red circle' (an image never holds
  two objects of the same colour and shape)."""
  return f'{COLORS[obj["color"]]} {SHAPES[obj["shape"]]}'


def make_example(rng: np.random.Generator, image_size: int = 64,
                 split: str = 'train') -> dict:
  """One image with captions and labels (labels describe object 0).

  Args:
    rng: source of randomness, e.g. `example_rng(seed, split, index)`.
    image_size: side of the square RGB image in pixels.
    split: 'train' excludes `HELDOUT_COMBOS`; 'validation' and 'test' use a
      held-out pair for about 25% of single-object images.

  Returns:
    dict with image (uint8 [S, S, 3]), captions (list of str), shape, color,
    combo, size, num_objects (ints) and objects (list of per-object dicts
    with the same labels plus position, center, diameter, rotation, box (normalised
    y0, x0, y1, x1 of the drawn pixels) and region_caption ('red circle')).
  """
  if split not in SPLIT_IDS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLIT_IDS}.')
  num_objects = 2 if rng.uniform() < _TWO_OBJECT_PROB else 1
  combos = _sample_combos(rng, split, num_objects)
  objects = _sample_objects(rng, combos, image_size)
  first = objects[0]
  image, boxes = render(rng, objects, image_size, with_boxes=True)
  for obj, box in zip(objects, boxes):
    obj['box'], obj['region_caption'] = box, region_caption(obj)
  return dict(
      image=image,
      captions=captions(objects),
      shape=first['shape'],
      color=first['color'],
      combo=combo_index(first['color'], first['shape']),
      size=first['size'],
      num_objects=num_objects,
      objects=objects,
  )
