"""Evaluation-only pp ops: CLIP's resize of the shorter side before a central crop, and the
derived labels of the zero-shot suite's VTAB tasks (CLEVR count/distance, KITTI distance).

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


# Derived labels of the zero-shot suite's VTAB tasks, as VTAB (google-research/
# task_adaptation, data/clevr.py and data/kitti.py) and CLIP_benchmark define them.
def _bucket(value, thresholds):
  """Index i of the bucket thresholds[i] < value <= thresholds[i + 1]."""
  return tf.reduce_sum(tf.cast(tf.constant(thresholds, tf.float32) < value, tf.int64)) - 1


def _objects(data, op, *keys):
  objects = data.get('objects')
  if not isinstance(objects, dict) or any(k not in objects for k in keys):
    raise KeyError(f"pp op '{op}' needs data['objects'] with {list(keys)}; got keys "
                   f'{sorted(objects) if isinstance(objects, dict) else sorted(data)}.')
  return objects


@preprocess.register_op('clevr_count_label')
def _clevr_count_label(outkey='label'):
  """CLEVR count_all: the number of objects - 3 (3..10 objects -> classes 0..7)."""
  def _op(data):
    size = _objects(data, 'clevr_count_label', 'size')['size']
    return {**data, outkey: tf.cast(tf.size(size), tf.int64) - 3}
  return _op


@preprocess.register_op('clevr_distance_label')
def _clevr_distance_label(outkey='label'):
  """CLEVR closest_object_distance: the nearest object's depth in 6 buckets."""
  def _op(data):
    coords = _objects(data, 'clevr_distance_label', 'pixel_coords')['pixel_coords']
    depth = tf.reduce_min(tf.cast(coords, tf.float32)[:, 2])
    return {**data, outkey: _bucket(depth, (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0))}
  return _op


@preprocess.register_op('kitti_distance_label')
def _kitti_distance_label(outkey='label'):
  """KITTI closest_vehicle_distance: the nearest car/van/truck (types 0-2) by depth (m):
  < 8, < 20, further, or no vehicle (classes 0..3)."""
  def _op(data):
    objects = _objects(data, 'kitti_distance_label', 'type', 'location')
    depth = tf.cast(objects['location'], tf.float32)[:, 2]
    vehicle = tf.cast(objects['type'], tf.int64) < 3
    nearest = tf.reduce_min(tf.concat([tf.boolean_mask(depth, vehicle), [1000.0]], 0))
    return {**data, outkey: _bucket(nearest, (-100.0, 8.0, 20.0, 999.0))}
  return _op
