"""Tests for mmcl.data.tokenizers."""
import random

import numpy as np
import pytest
import tensorflow as tf

from mmcl.data import tokenizers

TEXTS = [
    "",
    "a",
    "hello world",
    "Grüße aus Köln — naïve café 日本語 🙂",
    "a photo of a dog " * 20,  # Longer than max_len below.
]
MAX_LEN = 16


def _tf_ids(tok, texts, max_len):
  """Runs tokenize_tf inside a tf.data map, as the input pipeline does."""
  ds = tf.data.Dataset.from_tensor_slices(texts).map(
      lambda t: tok.tokenize_tf(t, max_len))
  assert ds.element_spec.shape == (max_len,)
  return np.stack(list(ds.as_numpy_iterator()))


def _check_layout(tok, ids, max_len):
  assert ids.dtype == np.int32 and ids.shape[-1] == max_len
  for row in ids:
    nonpad = np.flatnonzero(row != tok.pad_id)
    assert nonpad.size, "EOS must always be present"
    last = nonpad[-1]
    assert row[last] == tok.eos_id
    assert np.all(row[last + 1:] == tok.pad_id)
    assert np.sum(row == tok.eos_id) == 1


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  rng = random.Random(0)
  words = ["a", "photo", "of", "the", "dog", "cat", "red", "blue", "small",
           "big", "car", "house", "tree", "on", "in", "with", "running"]
  letters = "abcdefghijklmnopqrstuvwxyz"
  words += ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
            for _ in range(60)]
  sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
               for _ in range(400)]
  prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=100,
      model_type="unigram", character_coverage=1.0, minloglevel=2,
      unk_id=0, bos_id=-1, eos_id=1, pad_id=-1)
  return prefix + ".model"


def test_byte_tokenizer_ids_and_roundtrip():
  tok = tokenizers.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (258, 0, 1)
  ids = tok.tokenize("hé", 6)
  np.testing.assert_array_equal(ids, [[ord("h") + 2, 0xC3 + 2, 0xA9 + 2, 1,
                                       0, 0]])
  for text in TEXTS[:4]:
    assert tok.detokenize(tok.tokenize(text, 200)[0]) == text


def test_byte_tokenizer_truncation_keeps_eos():
  tok = tokenizers.ByteTokenizer()
  ids = tok.tokenize(["abcdefgh", "abc"], 4)
  np.testing.assert_array_equal(
      ids, [[ord("a") + 2, ord("b") + 2, ord("c") + 2, 1],
            [ord("a") + 2, ord("b") + 2, ord("c") + 2, 1]])
  np.testing.assert_array_equal(tok.tokenize("", 3), [[1, 0, 0]])
  np.testing.assert_array_equal(tok.tokenize("xyz", 1), [[1]])
  assert tok.detokenize(ids[0]) == "abc"
  _check_layout(tok, tok.tokenize(TEXTS, MAX_LEN), MAX_LEN)


@pytest.mark.parametrize("max_len", [1, 5, MAX_LEN, 300])
def test_byte_tokenizer_tf_matches_python(max_len):
  tok = tokenizers.ByteTokenizer()
  py = tok.tokenize(TEXTS, max_len)
  np.testing.assert_array_equal(_tf_ids(tok, TEXTS, max_len), py)
  _check_layout(tok, py, max_len)


def test_tokenize_shapes_and_errors():
  tok = tokenizers.ByteTokenizer()
  assert tok.tokenize([], 4).shape == (0, 4)
  assert tok.tokenize("x", 4).shape == (1, 4)
  with pytest.raises(ValueError, match="max_len"):
    tok.tokenize("x", 0)
  with pytest.raises(ValueError, match="scalar"):
    tok.tokenize_tf(tf.constant(["a", "b"]), 4)


def test_sentencepiece_tokenizer(sp_model):
  tok = tokenizers.SentencePieceTokenizer(sp_model)
  assert tok.pad_id == 0 and tok.eos_id == 1 and tok.vocab_size == 100
  texts = TEXTS + ["a photo of the red dog", "ZZZ unseen QQQ"]
  for max_len in (1, 4, MAX_LEN, 64):
    py = tok.tokenize(texts, max_len)
    _check_layout(tok, py, max_len)
    np.testing.assert_array_equal(_tf_ids(tok, texts, max_len), py)
  ids = tok.tokenize("a photo of the red dog", 64)[0]
  assert tok.detokenize(ids) == "a photo of the red dog"
  # Unknown characters map to <unk> == 0 == pad before EOS: still decodable.
  unk_ids = tok.tokenize("dog ZZZ cat", 64)[0]
  assert 0 in unk_ids[:np.argmax(unk_ids == tok.eos_id)]
  assert tok.detokenize(unk_ids).startswith("dog")
  assert tok.detokenize(unk_ids).endswith("cat")
  assert tok.detokenize([5, 6, 0, 0]) == tok.detokenize([5, 6])
  long_ids = tok.tokenize(TEXTS[-1], MAX_LEN)[0]
  assert long_ids[-1] == tok.eos_id and np.all(long_ids[:-1] > 1)


def test_sentencepiece_requires_eos(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  prefix = str(tmp_path / "noeos")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["a b c d e f g"] * 50), model_prefix=prefix,
      vocab_size=10, minloglevel=2, eos_id=-1, bos_id=-1)
  with pytest.raises(ValueError, match="eos_id"):
    tokenizers.SentencePieceTokenizer(prefix + ".model")


def test_get_tokenizer(sp_model):
  assert isinstance(tokenizers.get_tokenizer("bytes"),
                    tokenizers.ByteTokenizer)
  assert tokenizers.get_tokenizer("bytes") is tokenizers.get_tokenizer("bytes")
  tok = tokenizers.get_tokenizer("sp:" + sp_model)
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert tok is tokenizers.get_tokenizer("sp:" + sp_model)
  for bad in ("byte", "sp:", "sentencepiece", ""):
    with pytest.raises(ValueError, match="valid forms"):
      tokenizers.get_tokenizer(bad)
  with pytest.raises(FileNotFoundError):
    tokenizers.get_tokenizer("sp:/nonexistent/model.model")
