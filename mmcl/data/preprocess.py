"""Registry of tf.data preprocessing ops and the parser for pp strings.

A pp string chains ops with '|', e.g.

  'decode|resize(64)|value_range(-1, 1)|choice(inkey="captions", '
  'outkey="texts")|tokenize(max_len=80, inkey="texts", outkey="text")|'
  'keep("image", "text")'

Each op is registered as a factory `(*args, **kwargs) -> (dict -> dict)`.
Arguments must be python literals (parsed with `ast.literal_eval`, never
evaluated), and factories run at parse time, so typos and bad arguments fail
before any data flows. To add an op:

  @register_op("my_op")
  def _my_op(key="image"):
    def _op(data):
      data = dict(data)
      data[key] = ...
      return data
    return _op

Randomness is stateless: random ops read `data['_seed']` (int32/int64 [2],
added per example by the input pipeline), split it, use one half and write the
other half back, so a fixed seed gives the same output for any op order.

Image conventions: `decode` yields uint8 [H, W, 3]. `resize` and
`inception_crop` (when it resizes) output float32 with the input's value range
(0..255 for uint8 input, clipped to it): keeping float avoids a second rounding
before `value_range`, which always outputs float32.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

import tensorflow as tf

from mmcl.data import tokenizers

Data = dict[str, Any]
Op = Callable[[Data], Data]

SEED_KEY = "_seed"
_REGISTRY: dict[str, Callable[..., Op]] = {}


def register_op(name: str):
  """Decorator registering an op factory under `name` for pp strings."""
  if not name.isidentifier():
    raise ValueError(f"pp op name must be an identifier, got {name!r}.")

  def _register(factory):
    old = _REGISTRY.get(name)
    # Re-registering the same function (e.g. module reload) is fine.
    if old is not None and (old.__module__, old.__qualname__) != (
        factory.__module__, factory.__qualname__):
      raise ValueError(f"pp op {name!r} is already registered by "
                       f"{old.__module__}.{old.__qualname__}.")
    _REGISTRY[name] = factory
    return factory

  return _register


def registered_ops() -> list[str]:
  """Sorted names of all registered ops."""
  return sorted(_REGISTRY)


# --------------------------------------------------------------------------
# Parsing.
# --------------------------------------------------------------------------


def _split_ops(pp: str) -> list[str]:
  """Splits on '|' outside quotes and brackets."""
  parts, buf, depth, quote, escape = [], [], 0, None, False
  for ch in pp:
    if quote:
      if escape:
        escape = False
      elif ch == "\\":
        escape = True
      elif ch == quote:
        quote = None
    elif ch in "\"'":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "|" and depth == 0:
      parts.append("".join(buf))
      buf = []
      continue
    buf.append(ch)
  parts.append("".join(buf))
  return [p.strip() for p in parts]


def _parse_op(op_str: str, pp: str) -> tuple[str, tuple[Any, ...], dict]:
  """Parses 'name' or 'name(literal, ..., key=literal)' safely."""
  try:
    node = ast.parse(op_str, mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Cannot parse pp op {op_str!r} in {pp!r}: {e}") from e
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f"Cannot parse pp op {op_str!r} in {pp!r}: expected "
                     "'name' or 'name(args)'.")
  name = node.func.id
  try:
    args, kwargs = [], {}
    for a in node.args:
      if isinstance(a, ast.Starred):
        raise ValueError("*args are not allowed")
      args.append(ast.literal_eval(a))
    for kw in node.keywords:
      if kw.arg is None:
        raise ValueError("**kwargs are not allowed")
      kwargs[kw.arg] = ast.literal_eval(kw.value)
  except ValueError as e:  # literal_eval raises ValueError for non-literals.
    raise ValueError(f"Bad arguments for pp op '{name}' in {pp!r}: only "
                     f"python literals are allowed ({e}).") from e
  return name, tuple(args), kwargs


def get_preprocess_fn(pp: str) -> Callable[[Data], Data]:
  """Builds the function applying the ops of `pp` in order.

  Args:
    pp: '|'-separated ops; an empty/whitespace string is the identity.

  Returns:
    fn(data: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]; the input dict is
    not modified.

  Raises:
    ValueError: unknown op, unparsable op or bad arguments (at parse time).
  """
  ops = []
  if pp.strip():
    for op_str in _split_ops(pp):
      if not op_str:
        raise ValueError(f"Empty pp op in {pp!r} (stray '|'?).")
      name, args, kwargs = _parse_op(op_str, pp)
      if name not in _REGISTRY:
        raise ValueError(f"Unknown pp op '{name}' in '{pp}'; valid ops: "
                         f"{', '.join(registered_ops())}.")
      try:
        ops.append(_REGISTRY[name](*args, **kwargs))
      except (TypeError, ValueError) as e:
        raise ValueError(
            f"Bad arguments for pp op '{name}' ({op_str!r}) in {pp!r}: {e}"
        ) from e

  def _preprocess(data: Data) -> Data:
    data = dict(data)
    for op in ops:
      data = op(data)
    return data

  return _preprocess


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _next_seed(data: Data, op_name: str) -> tf.Tensor:
  """Splits data['_seed'] in place; returns the half this op may use."""
  if SEED_KEY not in data:
    raise KeyError(
        f"Random pp op '{op_name}' needs data['{SEED_KEY}'] (an int32/int64 "
        "tensor of shape [2]); the input pipeline must add one per example.")
  seeds = tf.random.experimental.stateless_split(data[SEED_KEY], 2)
  data[SEED_KEY] = seeds[1]
  return seeds[0]


def _get(data: Data, key: str, op_name: str):
  if key not in data:
    raise KeyError(f"pp op '{op_name}' needs key {key!r}; available keys: "
                   f"{sorted(data)}.")
  return data[key]


def _hw(size, op_name: str) -> tuple[int, int]:
  """int or (h, w) -> (h, w) of positive ints."""
  if isinstance(size, int):
    size = (size, size)
  if (not isinstance(size, (tuple, list)) or len(size) != 2 or
      not all(isinstance(s, int) and s > 0 for s in size)):
    raise ValueError(f"{op_name}: size must be a positive int or (h, w), got "
                     f"{size!r}.")
  return tuple(size)


def _check_key(value, what="key"):
  if not isinstance(value, str):
    raise ValueError(f"{what} must be a string, got {value!r}.")
  return value


def _resize(image: tf.Tensor, hw, method: str, antialias: bool) -> tf.Tensor:
  """Resizes to float32 in the input's value range (clipped for ints)."""
  dtype = image.dtype
  out = tf.image.resize(image, hw, method=method, antialias=antialias)
  out = tf.cast(out, tf.float32)
  if dtype.is_integer:  # Bicubic/lanczos overshoot the input range.
    out = tf.clip_by_value(out, float(dtype.min), float(dtype.max))
  return out


_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3",
                   "lanczos5", "gaussian", "mitchellcubic")


def _check_method(method):
  if method not in _RESIZE_METHODS:
    raise ValueError(f"method must be one of {_RESIZE_METHODS}, got "
                     f"{method!r}.")
  return method


# --------------------------------------------------------------------------
# Image ops.
# --------------------------------------------------------------------------


@register_op("decode")
def _decode(key="image", outkey=None, channels=3):
  """Encoded image bytes (PNG/JPEG/GIF/BMP) -> uint8 [H, W, channels].

  Already-decoded uint8 images pass through unchanged.
  """
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    image = _get(data, key, "decode")
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels,
                                 expand_animations=False)
      image.set_shape([None, None, channels])
    elif image.dtype != tf.uint8:
      raise ValueError(f"decode: data[{key!r}] must be encoded bytes or a "
                       f"uint8 image, got {image.dtype.name}.")
    data[outkey] = image
    return data

  return _op


@register_op("resize")
def _resize_op(size, method="bilinear", antialias=True, key="image",
               outkey=None):
  """Resizes to size (int or (h, w)); output float32, see module docstring."""
  hw = _hw(size, "resize")
  _check_method(method)
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    data[outkey] = _resize(_get(data, key, "resize"), hw, method, antialias)
    return data

  return _op


@register_op("central_crop")
def _central_crop(size, key="image", outkey=None):
  """Crops the central (h, w) window; keeps dtype."""
  h, w = _hw(size, "central_crop")
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    image = _get(data, key, "central_crop")
    shape = tf.shape(image)
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    # crop_to_bounding_box asserts the image is large enough.
    data[outkey] = tf.image.crop_to_bounding_box(image, top, left, h, w)
    return data

  return _op


@register_op("random_crop")
def _random_crop(size, key="image", outkey=None):
  """Crops a uniformly random (h, w) window; keeps dtype. Needs _seed."""
  h, w = _hw(size, "random_crop")
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    image = _get(data, key, "random_crop")
    seed = _next_seed(data, "random_crop")
    crop_shape = tf.concat([[h, w], tf.shape(image)[2:]], axis=0)
    out = tf.image.stateless_random_crop(image, crop_shape, seed=seed)
    out.set_shape([h, w] + image.shape[2:].as_list())
    data[outkey] = out
    return data

  return _op


@register_op("flip_lr")
def _flip_lr(key="image", outkey=None):
  """Flips left-right with probability 1/2. Needs _seed."""
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    image = _get(data, key, "flip_lr")
    seed = _next_seed(data, "flip_lr")
    data[outkey] = tf.image.stateless_random_flip_left_right(image, seed)
    return data

  return _op


@register_op("inception_crop")
def _inception_crop(size=None, area_min=5, area_max=100,
                    aspect_ratio_range=(3 / 4, 4 / 3), method="bilinear",
                    antialias=True, key="image", outkey=None):
  """Random resized crop ("Inception" crop). Needs _seed.

  Args:
    size: output int or (h, w); None keeps the crop's size and dtype.
    area_min: minimal crop area, in percent of the image.
    area_max: maximal crop area, in percent of the image.
    aspect_ratio_range: (min, max) of the crop's width / height.
    method: resize method.
    antialias: resize antialiasing.
    key: input key.
    outkey: output key (defaults to key).

  Returns:
    The op; output float32 when resizing (see module docstring).
  """
  hw = None if size is None else _hw(size, "inception_crop")
  if not 0 < area_min <= area_max <= 100:
    raise ValueError("need 0 < area_min <= area_max <= 100, got "
                     f"{area_min}, {area_max}.")
  _check_method(method)
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    image = _get(data, key, "inception_crop")
    seed = _next_seed(data, "inception_crop")
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(aspect_ratio_range),
        area_range=(area_min / 100, area_max / 100),
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None] + image.shape[2:].as_list())
    if hw is not None:
      crop = _resize(crop, hw, method, antialias)
    data[outkey] = crop
    return data

  return _op


@register_op("inception_crops")
def _inception_crops(n, size, area_min=5, area_max=40, aspect_ratio_range=(3 / 4, 4 / 3),
                     method="bilinear", antialias=True, key="image", outkey="local_crops"):
  """`n` independent inception crops, resized and stacked: float32 [n, h, w, C].

  Multi-crop views for self-distillation in the same tf.data pass as `image`: SILC
  uses 8 local crops of 5-40% of the image area (DINO's local range). Needs _seed.
  """
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}.")
  if size is None:
    raise ValueError("inception_crops needs a size: the crops are stacked.")
  one = _inception_crop(size, area_min, area_max, aspect_ratio_range, method, antialias,
                        key=key, outkey="_crop")
  outkey = _check_key(outkey, "outkey")

  def _op(data):
    data = dict(data)
    crops = []
    for _ in range(n):  # Each crop splits the seed on: n different crops.
      out = one(data)
      data[SEED_KEY] = out[SEED_KEY]
      crops.append(out["_crop"])
    data[outkey] = tf.stack(crops)
    return data

  return _op


@register_op("value_range")
def _value_range(vmin, vmax, in_min=0, in_max=255, clip_values=False,
                 key="image", outkey=None):
  """Linearly maps [in_min, in_max] to [vmin, vmax]; output float32."""
  if in_max == in_min:
    raise ValueError("in_min and in_max must differ.")
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    x = tf.cast(_get(data, key, "value_range"), tf.float32)
    x = (x - in_min) / (in_max - in_min)
    x = vmin + x * (vmax - vmin)
    if clip_values:
      x = tf.clip_by_value(x, min(vmin, vmax), max(vmin, vmax))
    data[outkey] = x
    return data

  return _op


# --------------------------------------------------------------------------
# Text and generic ops.
# --------------------------------------------------------------------------


@register_op("choice")
def _choice(inkey="texts", outkey=None):
  """Picks one element of a 1-D feature uniformly at random. Needs _seed."""
  _check_key(inkey, "inkey")
  outkey = _check_key(outkey or inkey, "outkey")

  def _op(data):
    data = dict(data)
    values = _get(data, inkey, "choice")
    n = tf.shape(values)[0]
    with tf.control_dependencies([tf.debugging.assert_positive(
        n, message=f"choice: data[{inkey!r}] is empty")]):
      seed = _next_seed(data, "choice")
      idx = tf.random.stateless_uniform([], seed, minval=0, maxval=n,
                                        dtype=tf.int32)
    data[outkey] = tf.gather(values, idx)
    return data

  return _op


@register_op("tokenize")
def _tokenize(max_len, tokenizer="bytes", inkey="texts", outkey="text"):
  """Tokenizes a string (-> int32 [max_len]) or 1-D strings ([N, max_len])."""
  tok = tokenizers.get_tokenizer(tokenizer)  # Loads/validates at parse time.
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}.")
  _check_key(inkey, "inkey")
  _check_key(outkey, "outkey")

  def _op(data):
    data = dict(data)
    text = _get(data, inkey, "tokenize")
    if text.shape.rank == 1:
      out = tf.map_fn(lambda t: tok.tokenize_tf(t, max_len), text,
                      fn_output_signature=tf.TensorSpec([max_len], tf.int32))
    else:
      out = tok.tokenize_tf(text, max_len)
    data[outkey] = out
    return data

  return _op


@register_op("lower")
def _lower(key="texts", outkey=None):
  """Lowercases strings (UTF-8 aware), any shape."""
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    data[outkey] = tf.strings.lower(_get(data, key, "lower"), encoding="utf-8")
    return data

  return _op


@register_op("keep")
def _keep(*keys):
  """Keeps only `keys` (so '_seed' is dropped unless listed)."""
  for k in keys:
    _check_key(k)

  def _op(data):
    return {k: _get(data, k, "keep") for k in keys}

  return _op


@register_op("drop")
def _drop(*keys):
  """Removes `keys`; each must exist."""
  for k in keys:
    _check_key(k)

  def _op(data):
    for k in keys:
      _get(data, k, "drop")
    return {k: v for k, v in data.items() if k not in keys}

  return _op


@register_op("copy")
def _copy(inkey, outkey):
  """data[outkey] = data[inkey]."""
  _check_key(inkey, "inkey")
  _check_key(outkey, "outkey")

  def _op(data):
    data = dict(data)
    data[outkey] = _get(data, inkey, "copy")
    return data

  return _op


@register_op("rename")
def _rename(inkey=None, outkey=None, **new_from_old):
  """Renames keys: rename("old", "new") and/or rename(new="old", ...).

  The two forms can be combined; 'inkey' and 'outkey' are therefore reserved
  and cannot be used as new key names in the keyword form.
  """
  mapping = dict(new_from_old)  # new -> old.
  if (inkey is None) != (outkey is None):
    raise ValueError("give both inkey and outkey, or neither.")
  if inkey is not None:
    mapping[_check_key(outkey, "outkey")] = _check_key(inkey, "inkey")
  if not mapping:
    raise ValueError("nothing to rename.")
  for old in mapping.values():
    _check_key(old)

  def _op(data):
    olds = {old: _get(data, old, "rename") for old in mapping.values()}
    data = {k: v for k, v in data.items() if k not in olds}
    data.update({new: olds[old] for new, old in mapping.items()})
    return data

  return _op


@register_op("onehot")
def _onehot(depth, key="label", outkey=None, on_value=1.0, off_value=0.0):
  """Integer label(s) -> float32 one-hot with a trailing `depth` axis."""
  if not isinstance(depth, int) or depth < 1:
    raise ValueError(f"depth must be a positive int, got {depth!r}.")
  _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    data[outkey] = tf.one_hot(_get(data, key, "onehot"), depth,
                              on_value=on_value, off_value=off_value,
                              dtype=tf.float32)
    return data

  return _op
