"""Image pp ops: decode, resizes, crops, flips, value range (see mmcl/data/preprocess.py)."""
import tensorflow as tf

from mmcl.data import preprocess as pp
from mmcl.data.preprocess import register_op


@register_op("decode")
def _decode(key="image", outkey=None, channels=3):
  """Encoded image bytes (PNG/JPEG/GIF/BMP) -> uint8 [H, W, channels].

  Already-decoded uint8 images pass through unchanged.
  """
  def decode(image):
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels, expand_animations=False)
      image.set_shape([None, None, channels])
    elif image.dtype != tf.uint8:
      raise ValueError(f"decode: data[{key!r}] must be encoded bytes or a uint8 image, got "
                       f"{image.dtype.name}.")
    return image
  return pp.map_op("decode", key, outkey, decode)


@register_op("resize")
def _resize(size, method="bilinear", antialias=True, key="image", outkey=None):
  """Resizes to size (int or (h, w)); output float32, see preprocess's docstring."""
  hw = pp.hw_of(size, "resize")
  pp.check_method(method)
  return pp.map_op("resize", key, outkey, lambda im: pp.resize(im, hw, method, antialias))


@register_op("resize_small")
def _resize_small(size, method="bicubic", antialias=True, key="image", outkey=None):
  """Resizes so the shorter side is `size`, keeping the aspect ratio; output float32.

  CLIP's eval transform is resize_small(224, 'bicubic')|central_crop(224).
  """
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f"resize_small: size must be a positive int, got {size!r}.")
  pp.check_method(method)

  def resize_small(image):
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.maximum(tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32), size)
    return pp.resize(image, new_hw, method, antialias)
  return pp.map_op("resize_small", key, outkey, resize_small)


@register_op("central_crop")
def _central_crop(size, key="image", outkey=None):
  """Crops the central (h, w) window; keeps dtype."""
  h, w = pp.hw_of(size, "central_crop")

  def crop(image):
    shape = tf.shape(image)
    # crop_to_bounding_box asserts the image is large enough.
    return tf.image.crop_to_bounding_box(image, (shape[0] - h) // 2, (shape[1] - w) // 2, h, w)
  return pp.map_op("central_crop", key, outkey, crop)


@register_op("random_crop")
def _random_crop(size, key="image", outkey=None):
  """Crops a uniformly random (h, w) window; keeps dtype. Needs _seed."""
  h, w = pp.hw_of(size, "random_crop")

  def crop(image, seed):
    out = tf.image.stateless_random_crop(
        image, tf.concat([[h, w], tf.shape(image)[2:]], axis=0), seed=seed)
    out.set_shape([h, w] + image.shape[2:].as_list())
    return out
  return pp.map_op("random_crop", key, outkey, crop, random=True)


@register_op("flip_lr")
def _flip_lr(key="image", outkey=None):
  """Flips left-right with probability 1/2. Needs _seed."""
  return pp.map_op("flip_lr", key, outkey, tf.image.stateless_random_flip_left_right,
                   random=True)


@register_op("inception_crop")
def _inception_crop(size=None, area_min=5, area_max=100, aspect_ratio_range=(3 / 4, 4 / 3),
                    method="bilinear", antialias=True, key="image", outkey=None):
  """Random resized crop ("Inception" crop). Needs _seed.

  size: output int or (h, w); None keeps the crop's size and dtype (else float32, see
  preprocess's docstring). area_min / area_max: the crop's area in percent of the image;
  aspect_ratio_range: (min, max) of its width / height.
  """
  hw = None if size is None else pp.hw_of(size, "inception_crop")
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"need 0 < area_min <= area_max <= 100, got {area_min}, {area_max}.")
  pp.check_method(method)

  def crop(image, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=tuple(aspect_ratio_range),
        area_range=(area_min / 100, area_max / 100), use_image_if_no_bounding_boxes=True)
    out = tf.slice(image, begin, crop_size)
    out.set_shape([None, None] + image.shape[2:].as_list())
    return out if hw is None else pp.resize(out, hw, method, antialias)
  return pp.map_op("inception_crop", key, outkey, crop, random=True)


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
  (outkey,) = pp.check_keys(outkey, what="outkey")

  def _op(data):
    data = dict(data)
    crops = []
    for _ in range(n):  # Each crop splits the seed on: n different crops.
      out = one(data)
      data[pp.SEED_KEY] = out[pp.SEED_KEY]
      crops.append(out["_crop"])
    data[outkey] = tf.stack(crops)
    return data

  return _op


@register_op("value_range")
def _value_range(vmin, vmax, in_min=0, in_max=255, clip_values=False, key="image",
                 outkey=None):
  """Linearly maps [in_min, in_max] to [vmin, vmax]; output float32."""
  if in_max == in_min:
    raise ValueError("in_min and in_max must differ.")

  def value_range(x):
    x = vmin + (tf.cast(x, tf.float32) - in_min) / (in_max - in_min) * (vmax - vmin)
    return tf.clip_by_value(x, min(vmin, vmax), max(vmin, vmax)) if clip_values else x
  return pp.map_op("value_range", key, outkey, value_range)
