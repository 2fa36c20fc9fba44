"""Text pp ops: choice (one caption of several), tokenize, lower (see preprocess.py)."""
import tensorflow as tf

from mmcl.data import preprocess as pp
from mmcl.data import tokenizers
from mmcl.data.preprocess import register_op


@register_op("choice")
def _choice(inkey="texts", outkey=None):
  """Picks one element of a 1-D feature uniformly at random. Needs _seed."""
  pp.check_keys(inkey, what="inkey")

  def choice(values, seed):
    n = tf.shape(values)[0]
    with tf.control_dependencies([tf.debugging.assert_positive(
        n, message=f"choice: data[{inkey!r}] is empty")]):
      idx = tf.random.stateless_uniform([], seed, minval=0, maxval=n, dtype=tf.int32)
    return tf.gather(values, idx)
  return pp.map_op("choice", inkey, outkey, choice, random=True)


@register_op("tokenize")
def _tokenize(max_len, tokenizer="bytes", inkey="texts", outkey="text"):
  """Tokenizes a string (-> int32 [max_len]) or 1-D strings ([N, max_len])."""
  tok = tokenizers.get_tokenizer(tokenizer)  # Loads/validates at parse time.
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}.")
  pp.check_keys(inkey, what="inkey")

  def tokenize(text):
    if text.shape.rank == 1:
      return tf.map_fn(lambda t: tok.tokenize_tf(t, max_len), text,
                       fn_output_signature=tf.TensorSpec([max_len], tf.int32))
    return tok.tokenize_tf(text, max_len)
  return pp.map_op("tokenize", inkey, outkey, tokenize)


@register_op("lower")
def _lower(key="texts", outkey=None):
  """Lowercases strings (UTF-8 aware), any shape."""
  return pp.map_op("lower", key, outkey, lambda s: tf.strings.lower(s, encoding="utf-8"))
