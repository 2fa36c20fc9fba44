"""Evaluation-only pp ops: CLIP's resize of the shorter side before a central crop.

Registered here (not in mmcl/data/preprocess.py) only because that file has another owner;
it belongs beside `resize` and `central_crop` and should move there.
"""
import tensorflow as tf

from mmcl.data import preprocess

_METHODS = ('bilinear', 'nearest', 'bicubic', 'area', 'lanczos3', 'lanczos5', 'gaussian',
            'mitchellcubic')


@preprocess.register_op('resize_small')
def _resize_small(size, method='bicubic', antialias=True, key='image', outkey=None):
  """Resizes so the shorter side is `size`, keeping the aspect ratio; output float32.

  CLIP's eval transform is resize_small(224, 'bicubic')|central_crop(224).
  """
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f'resize_small: size must be a positive int, got {size!r}.')
  if method not in _METHODS:
    raise ValueError(f'resize_small: method must be one of {_METHODS}, got {method!r}.')
  outkey = outkey or key

  def _op(data):
    data = dict(data)
    image = data[key]
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(hw)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), size)
    out = tf.cast(tf.image.resize(image, new_hw, method=method, antialias=antialias), tf.float32)
    if image.dtype.is_integer:  # Bicubic overshoots the input range, as in `resize`.
      out = tf.clip_by_value(out, float(image.dtype.min), float(image.dtype.max))
    data[outkey] = out
    return data

  return _op
