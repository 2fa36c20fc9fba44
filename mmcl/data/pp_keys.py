"""Key and label pp ops: keep, drop, copy, rename, onehot, and the derived labels of the
zero-shot suite's VTAB tasks (see mmcl/data/preprocess.py)."""
import tensorflow as tf

from mmcl.data import preprocess as pp
from mmcl.data.preprocess import register_op


@register_op("keep")
def _keep(*keys):
  """Keeps only `keys` (so '_seed' is dropped unless listed)."""
  pp.check_keys(*keys)
  return lambda data: {k: pp.get(data, k, "keep") for k in keys}


@register_op("drop")
def _drop(*keys):
  """Removes `keys`; each must exist."""
  pp.check_keys(*keys)

  def _op(data):
    for k in keys:
      pp.get(data, k, "drop")
    return {k: v for k, v in data.items() if k not in keys}

  return _op


@register_op("copy")
def _copy(inkey, outkey):
  """data[outkey] = data[inkey]."""
  pp.check_keys(inkey, what="inkey")
  pp.check_keys(outkey, what="outkey")
  return pp.map_op("copy", inkey, outkey, lambda x: x)


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
    mapping[pp.check_keys(outkey, what="outkey")[0]] = pp.check_keys(inkey, what="inkey")[0]
  if not mapping:
    raise ValueError("nothing to rename.")
  pp.check_keys(*mapping.values())

  def _op(data):
    olds = {old: pp.get(data, old, "rename") for old in mapping.values()}
    data = {k: v for k, v in data.items() if k not in olds}
    data.update({new: olds[old] for new, old in mapping.items()})
    return data

  return _op


@register_op("onehot")
def _onehot(depth, key="label", outkey=None, on_value=1.0, off_value=0.0):
  """Integer label(s) -> float32 one-hot with a trailing `depth` axis."""
  if not isinstance(depth, int) or depth < 1:
    raise ValueError(f"depth must be a positive int, got {depth!r}.")
  return pp.map_op("onehot", key, outkey, lambda x: tf.one_hot(
      x, depth, on_value=on_value, off_value=off_value, dtype=tf.float32))


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


@register_op('clevr_count_label')
def _clevr_count_label(outkey='label'):
  """CLEVR count_all: the number of objects - 3 (3..10 objects -> classes 0..7)."""
  def _op(data):
    size = _objects(data, 'clevr_count_label', 'size')['size']
    return {**data, outkey: tf.cast(tf.size(size), tf.int64) - 3}
  return _op


@register_op('clevr_distance_label')
def _clevr_distance_label(outkey='label'):
  """CLEVR closest_object_distance: the nearest object's depth in 6 buckets."""
  def _op(data):
    coords = _objects(data, 'clevr_distance_label', 'pixel_coords')['pixel_coords']
    depth = tf.reduce_min(tf.cast(coords, tf.float32)[:, 2])
    return {**data, outkey: _bucket(depth, (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0))}
  return _op


@register_op('kitti_distance_label')
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
