"""Tests for mmcl.data.preprocess."""
import numpy as np
import pytest
import tensorflow as tf

from mmcl.data import preprocess as pp_lib
from mmcl.data import tokenizers


def _seed(a=0, b=1):
  return tf.constant([a, b], tf.int64)


def _image(h=8, w=12):
  """uint8 [h, w, 3] with distinct, position-dependent values."""
  x = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3) % 251
  return tf.constant(x.astype(np.uint8))


def _run(pp, **data):
  return pp_lib.get_preprocess_fn(pp)(data)


# ----------------------------------------------------------------------------
# Parsing and registry.
# ----------------------------------------------------------------------------


def test_split_respects_quotes_and_brackets():
  assert pp_lib._split_ops('a|b(1, (2, 3))|c(x="p|q", y=\'|\')') == [
      "a", "b(1, (2, 3))", 'c(x="p|q", y=\'|\')']


def test_parse_args_kwargs_strings_tuples():
  assert pp_lib._parse_op("decode", "") == ("decode", (), {})
  name, args, kwargs = pp_lib._parse_op(
      'op(3, (4, 5), "s", k=-1.5, t=("a", "b"), n=None, f=True)', "")
  assert name == "op"
  assert args == (3, (4, 5), "s")
  assert kwargs == {"k": -1.5, "t": ("a", "b"), "n": None, "f": True}


def test_registered_op_receives_parsed_args():
  seen = {}

  @pp_lib.register_op("_test_record")
  def _record(*args, **kwargs):
    seen.update(args=args, kwargs=kwargs)
    return lambda data: {**data, "rec": tf.constant(1)}

  try:
    out = _run(' _test_record(64, (1, 2), key="x y") | keep("rec") ')
    assert seen == {"args": (64, (1, 2)), "kwargs": {"key": "x y"}}
    assert set(out) == {"rec"}
  finally:
    del pp_lib._REGISTRY["_test_record"]


def test_register_conflict():
  with pytest.raises(ValueError, match="already registered"):
    pp_lib.register_op("resize")(lambda: None)


def test_unknown_op_lists_valid_ops():
  pp = "decode|fooo(1)|keep('image')"
  with pytest.raises(ValueError) as e:
    pp_lib.get_preprocess_fn(pp)
  msg = str(e.value)
  assert f"Unknown pp op 'fooo' in '{pp}'" in msg
  for name in ("decode", "resize", "tokenize", "keep", "value_range"):
    assert name in msg


@pytest.mark.parametrize("pp,match", [
    ("resize(__import__('os'))", "resize"),  # No evaluation of code.
    ("resize(size=x)", "resize"),
    ("resize(1, 2, 3, 4, 5, 6, 7)", "resize"),
    ("resize(-3)", "resize"),
    ("central_crop(bogus=1)", "central_crop"),
    ("value_range(0, 1, in_min=1, in_max=1)", "value_range"),
    ("tokenize(8, tokenizer='nope')", "tokenize"),
    ("os.system('x')", "Cannot parse"),
    ("resize(64", "Cannot parse"),
    ("decode||keep('image')", "Empty pp op"),
])
def test_bad_ops_fail_at_parse_time(pp, match):
  with pytest.raises(ValueError, match=match):
    pp_lib.get_preprocess_fn(pp)


def test_empty_pp_is_identity():
  data = {"a": tf.constant(1)}
  for pp in ("", "  "):
    out = pp_lib.get_preprocess_fn(pp)(data)
    assert out == data


def test_input_dict_not_modified():
  data = {"image": _image(), "_seed": _seed()}
  pp_lib.get_preprocess_fn("flip_lr|resize(4)|keep('image')")(data)
  assert set(data) == {"image", "_seed"}
  assert data["image"].dtype == tf.uint8


# ----------------------------------------------------------------------------
# Image ops.
# ----------------------------------------------------------------------------


def test_decode():
  img = _image()
  out = _run("decode", image=tf.io.encode_png(img))["image"]
  assert out.dtype == tf.uint8 and out.shape == (8, 12, 3)
  np.testing.assert_array_equal(out, img)
  gray = tf.io.encode_png(img[:, :, :1])
  assert _run("decode", image=gray)["image"].shape == (8, 12, 3)
  assert _run("decode", image=img)["image"] is img  # Pass-through.
  with pytest.raises(ValueError, match="uint8"):
    _run("decode", image=tf.zeros([2, 2, 3]))


def test_resize():
  out = _run("resize(4)", image=_image())["image"]
  assert out.shape == (4, 4, 3) and out.dtype == tf.float32
  out = _run("resize((6, 3), method='bicubic')", image=_image())["image"]
  assert out.shape == (6, 3, 3)
  assert 0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255
  const = tf.fill([8, 12, 3], tf.constant(200, tf.uint8))
  np.testing.assert_allclose(_run("resize(5)", image=const)["image"], 200,
                             atol=1e-3)
  out = _run("resize(4, key='a', outkey='b')", a=_image())
  assert out["a"].shape == (8, 12, 3) and out["b"].shape == (4, 4, 3)


def test_central_crop():
  img = _image()
  out = _run("central_crop((4, 6))", image=img)["image"]
  assert out.dtype == tf.uint8 and out.shape == (4, 6, 3)
  np.testing.assert_array_equal(out, img[2:6, 3:9])
  np.testing.assert_array_equal(_run("central_crop(8)", image=img)["image"],
                                img[:, 2:10])


def test_random_crop_deterministic_and_varies():
  img = _image()
  crops = [_run("random_crop(4)", image=img, _seed=_seed(s))["image"].numpy()
           for s in range(20)]
  assert all(c.shape == (4, 4, 3) and c.dtype == np.uint8 for c in crops)
  again = _run("random_crop(4)", image=img, _seed=_seed(0))["image"]
  np.testing.assert_array_equal(again, crops[0])
  assert len({c.tobytes() for c in crops}) > 3
  full = img.numpy()
  for c in crops:  # Each crop is a window of the image.
    top, left = np.argwhere((full[:, :, 0] == c[0, 0, 0]))[0]
    np.testing.assert_array_equal(c, full[top:top + 4, left:left + 4])


def test_flip_lr():
  img = _image()
  outs = [_run("flip_lr", image=img, _seed=_seed(s))["image"].numpy()
          for s in range(20)]
  flipped = [np.array_equal(o, img.numpy()[:, ::-1]) for o in outs]
  same = [np.array_equal(o, img.numpy()) for o in outs]
  assert all(f or s for f, s in zip(flipped, same))
  assert any(flipped) and any(same)


def test_inception_crop():
  img = tf.image.resize(_image(32, 32), (64, 48))
  outs = [_run("inception_crop(16)", image=img, _seed=_seed(s))["image"]
          for s in range(5)]
  assert all(o.shape == (16, 16, 3) and o.dtype == tf.float32 for o in outs)
  assert len({o.numpy().tobytes() for o in outs}) > 1
  out = _run("inception_crop(area_min=50)", image=_image(), _seed=_seed())
  assert out["image"].dtype == tf.uint8 and out["image"].shape[2] == 3


def test_random_ops_need_seed_and_advance_it():
  for op in ("random_crop(4)", "flip_lr", "inception_crop(4)",
             "choice(inkey='image')"):
    with pytest.raises(KeyError, match="_seed"):
      _run(op, image=_image())
  out = _run("flip_lr", image=_image(), _seed=_seed())
  assert out["_seed"].shape == (2,)
  assert not np.array_equal(out["_seed"], _seed())
  seed32 = tf.constant([3, 4], tf.int32)
  out = _run("inception_crop(4)|random_crop(2)|flip_lr|choice('t')",
             image=_image(), t=tf.constant(["x", "y"]), _seed=seed32)
  assert out["image"].shape == (2, 2, 3) and out["_seed"].dtype == tf.int32


def test_value_range():
  x = tf.constant([0, 51, 255], tf.uint8)
  out = _run("value_range(-1, 1)", image=x)["image"]
  assert out.dtype == tf.float32
  np.testing.assert_allclose(out, [-1, -0.6, 1], atol=1e-6)
  out = _run("value_range(0, 1, in_min=-1, in_max=1, clip_values=True)",
             image=tf.constant([-2.0, 0.0, 3.0]))["image"]
  np.testing.assert_allclose(out, [0, 0.5, 1])


# ----------------------------------------------------------------------------
# Text and generic ops.
# ----------------------------------------------------------------------------


def test_choice():
  texts = tf.constant(["a", "b", "c", "d"])
  picks = [_run('choice(inkey="captions", outkey="texts")', captions=texts,
                _seed=_seed(s))["texts"].numpy() for s in range(40)]
  assert set(picks) == {b"a", b"b", b"c", b"d"}
  again = _run('choice(inkey="captions", outkey="texts")', captions=texts,
               _seed=_seed(7))
  assert again["texts"].numpy() == picks[7]
  assert again["captions"].shape == (4,)
  assert _run("choice", texts=texts, _seed=_seed())["texts"].shape == ()


def test_tokenize_and_lower():
  tok = tokenizers.get_tokenizer("bytes")
  out = _run("lower|tokenize(max_len=8)", texts=tf.constant("HeLLo WÖRLD"))
  assert out["text"].dtype == tf.int32 and out["text"].shape == (8,)
  np.testing.assert_array_equal(out["text"],
                                tok.tokenize("hello w", 8)[0])
  out = _run("tokenize(6, inkey='caps', outkey='toks')",
             caps=tf.constant(["ab", "", "long caption"]))
  np.testing.assert_array_equal(out["toks"],
                                tok.tokenize(["ab", "", "long caption"], 6))


def test_keep_drop_copy_rename_onehot():
  data = dict(a=tf.constant(1), b=tf.constant(2), _seed=_seed())
  assert set(_run("keep('a')", **data)) == {"a"}
  assert set(_run("keep('a', '_seed')", **data)) == {"a", "_seed"}
  assert set(_run("drop('a')", **data)) == {"b", "_seed"}
  out = _run("copy('a', 'c')", **data)
  assert int(out["c"]) == 1 and int(out["a"]) == 1
  out = _run("rename('a', 'z')", **data)
  assert set(out) == {"z", "b", "_seed"} and int(out["z"]) == 1
  out = _run("rename(x='b', y='a')", **data)
  assert set(out) == {"x", "y", "_seed"} and int(out["x"]) == 2
  out = _run("rename(a='b', b='a')", **data)  # Swap.
  assert (int(out["a"]), int(out["b"])) == (2, 1)
  with pytest.raises(KeyError, match="nope"):
    _run("keep('nope')", **data)
  with pytest.raises(KeyError, match="nope"):
    _run("drop('nope')", **data)
  out = _run("onehot(4)", label=tf.constant(2))["label"]
  np.testing.assert_array_equal(out, [0, 0, 1, 0])
  assert out.dtype == tf.float32
  out = _run("onehot(3, key='y', outkey='y1')", y=tf.constant([0, 2]))
  np.testing.assert_array_equal(out["y1"], [[1, 0, 0], [0, 0, 1]])


# ----------------------------------------------------------------------------
# End to end inside tf.data.
# ----------------------------------------------------------------------------


def test_pipeline_in_tf_data():
  rng = np.random.default_rng(0)
  n = 6
  images = [tf.io.encode_png(rng.integers(0, 256, (h, w, 3), np.uint8))
            for h, w in [(40, 30), (32, 32), (50, 64)] * 2]
  captions = [["a dog", "A DOG ON GRASS", "the dog"]] * n
  ds = tf.data.Dataset.from_tensor_slices({
      "image": tf.stack(images),
      "captions": tf.constant(captions),
      "label": tf.range(n),
  })
  ds = ds.enumerate().map(lambda i, d: {**d, "_seed": tf.stack([i, i + 1])})
  fn = pp_lib.get_preprocess_fn(
      'decode|inception_crop(24)|flip_lr|resize(16)|value_range(-1, 1)|'
      'choice(inkey="captions", outkey="texts")|lower|'
      'tokenize(max_len=20, inkey="texts", outkey="text")|onehot(10)|'
      'keep("image", "text", "label")')
  batch = next(iter(ds.map(fn).batch(n)))
  assert set(batch) == {"image", "text", "label"}
  assert batch["image"].shape == (n, 16, 16, 3)
  assert batch["image"].dtype == tf.float32
  assert -1 <= float(tf.reduce_min(batch["image"]))
  assert float(tf.reduce_max(batch["image"])) <= 1
  assert batch["text"].shape == (n, 20) and batch["text"].dtype == tf.int32
  assert batch["label"].shape == (n, 10)
  tok = tokenizers.get_tokenizer("bytes")
  allowed = {tok.detokenize(t) for t in tok.tokenize(
      ["a dog", "a dog on grass", "the dog"], 20)}
  assert {tok.detokenize(t) for t in batch["text"].numpy()} <= allowed
  # Same seeds -> same batch.
  batch2 = next(iter(ds.map(fn).batch(n)))
  np.testing.assert_array_equal(batch["image"], batch2["image"])
