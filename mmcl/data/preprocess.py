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

The ops live in pp_image.py (decode, resizes, crops, flips, value range), pp_text.py
(choice, tokenize, lower) and pp_keys.py (keep, drop, copy, rename, onehot, derived labels),
registered when mmcl.data is imported; most are one `map_op` call.

Image conventions: `decode` yields uint8 [H, W, 3]. `resize` and
`inception_crop` (when it resizes) output float32 with the input's value range
(0..255 for uint8 input, clipped to it): keeping float avoids a second rounding
before `value_range`, which always outputs float32.
"""
from __future__ import annotations

import ast
from typing import Any, Callable

import tensorflow as tf


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
# Helpers for the op modules.
# --------------------------------------------------------------------------


def next_seed(data: Data, op_name: str) -> tf.Tensor:
  """Splits data['_seed'] in place; returns the half this op may use."""
  if SEED_KEY not in data:
    raise KeyError(
        f"Random pp op '{op_name}' needs data['{SEED_KEY}'] (an int32/int64 "
        "tensor of shape [2]); the input pipeline must add one per example.")
  seeds = tf.random.experimental.stateless_split(data[SEED_KEY], 2)
  data[SEED_KEY] = seeds[1]
  return seeds[0]


def get(data: Data, key: str, op_name: str):
  if key not in data:
    raise KeyError(f"pp op '{op_name}' needs key {key!r}; available keys: "
                   f"{sorted(data)}.")
  return data[key]


def hw_of(size, op_name: str) -> tuple[int, int]:
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


def check_keys(*keys: str, what: str = "key") -> tuple[str, ...]:
  """Each key must be a string (a pp string's literal), else a ValueError naming it."""
  return tuple(_check_key(k, what) for k in keys)


def map_op(name: str, key: str, outkey: str | None, fn: Callable, *, random: bool = False):
  """The op data[outkey or key] = fn(data[key]), or fn(data[key], seed) for a random op
  (a stateless seed split off data['_seed']): the shape of most single-key ops."""
  key = _check_key(key)
  outkey = _check_key(outkey or key, "outkey")

  def _op(data):
    data = dict(data)
    x = get(data, key, name)
    data[outkey] = fn(x, next_seed(data, name)) if random else fn(x)
    return data

  return _op


def resize(image: tf.Tensor, hw, method: str, antialias: bool) -> tf.Tensor:
  """Resizes to float32 in the input's value range (clipped for ints)."""
  dtype = image.dtype
  out = tf.image.resize(image, hw, method=method, antialias=antialias)
  out = tf.cast(out, tf.float32)
  if dtype.is_integer:  # Bicubic/lanczos overshoot the input range.
    out = tf.clip_by_value(out, float(dtype.min), float(dtype.max))
  return out


_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3",
                   "lanczos5", "gaussian", "mitchellcubic")


def check_method(method):
  if method not in _RESIZE_METHODS:
    raise ValueError(f"method must be one of {_RESIZE_METHODS}, got "
                     f"{method!r}.")
  return method
