"""Text tokenizers shared by the tf.data pipeline and python-side evaluation.

Every tokenizer follows one layout so that text towers can pool at the last
non-pad token:

  ids = encode(text) + [eos_id]   # EOS is always present,
  truncated to max_len keeping EOS as the last token,
  right-padded with pad_id == 0 to max_len.

`tokenize` (numpy, used e.g. for zero-shot prompts) and `tokenize_tf` (inside
`tf.data.Dataset.map`) produce identical ids for the same text.
"""
from __future__ import annotations

import abc
import functools
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

PAD_ID = 0


def _finalize(ids: Sequence[int], max_len: int, eos_id: int) -> np.ndarray:
  """Appends EOS, truncates (EOS kept last) and right-pads to max_len."""
  ids = list(ids)[:max_len - 1] + [eos_id]
  out = np.full([max_len], PAD_ID, np.int32)
  out[:len(ids)] = ids
  return out


def _check_max_len(max_len: int) -> int:
  if not isinstance(max_len, (int, np.integer)) or max_len < 1:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}.")
  return int(max_len)


def _as_str(text) -> str:
  """Accepts str or UTF-8 bytes (tf.data hands bytes to python functions)."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, bytes):
    # 'replace' so one malformed record cannot kill the input pipeline.
    return text.decode("utf-8", errors="replace")
  if not isinstance(text, str):
    raise TypeError(f"Expected str or bytes, got {type(text).__name__}.")
  return text


class Tokenizer(abc.ABC):
  """Common interface; see the module docstring for the id layout."""

  pad_id: int = PAD_ID
  eos_id: int
  vocab_size: int

  def tokenize(self, texts: list[str] | str, max_len: int) -> np.ndarray:
    """Tokenizes python strings to int32 [N, max_len] (N=1 for a single str)."""
    max_len = _check_max_len(max_len)
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    rows = [_finalize(self._encode(_as_str(t)), max_len, self.eos_id)
            for t in texts]
    if not rows:
      return np.zeros([0, max_len], np.int32)
    return np.stack(rows)

  @abc.abstractmethod
  def tokenize_tf(self, text: tf.Tensor, max_len: int) -> tf.Tensor:
    """Tokenizes a scalar tf.string to int32 [max_len], same ids as tokenize."""

  def detokenize(self, ids) -> str:
    """Decodes ids up to the first EOS, dropping the trailing padding.

    Only trailing pads are cut (not everything after the first 0) because
    SentencePiece's <unk> shares id 0 with pad and may occur before EOS.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1).tolist()]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    while ids and ids[-1] == self.pad_id:
      ids.pop()
    return self._decode(ids)

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Text to ids, without EOS/padding."""

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """Ids (no EOS/padding) to text."""


def _check_scalar(text: tf.Tensor) -> tf.Tensor:
  text = tf.convert_to_tensor(text, tf.string)
  if text.shape.rank not in (None, 0):
    raise ValueError(
        f"tokenize_tf expects a scalar string, got shape {text.shape}; "
        "map it over the elements (e.g. tf.map_fn) for batches.")
  return tf.reshape(text, [])


class ByteTokenizer(Tokenizer):
  """Vocabulary-free tokenizer over UTF-8 bytes: byte b -> id b + 2.

  Ids 0 and 1 are pad and EOS. Works on bytes, not code points, so a
  non-ASCII character takes several tokens (and truncation may split one;
  `detokenize` then shows U+FFFD).
  """

  _OFFSET = 2
  eos_id = 1
  vocab_size = 256 + _OFFSET

  def _encode(self, text: str) -> list[int]:
    return [b + self._OFFSET for b in text.encode("utf-8")]

  def _decode(self, ids: list[int]) -> str:
    data = bytes(i - self._OFFSET for i in ids
                 if self._OFFSET <= i < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def tokenize_tf(self, text: tf.Tensor, max_len: int) -> tf.Tensor:
    max_len = _check_max_len(max_len)
    raw = tf.io.decode_raw(_check_scalar(text), tf.uint8)  # UTF-8 bytes.
    ids = tf.cast(raw[:max_len - 1], tf.int32) + self._OFFSET
    ids = tf.concat([ids, tf.constant([self.eos_id], tf.int32)], axis=0)
    ids = tf.pad(ids, [[0, max_len - tf.shape(ids)[0]]],
                 constant_values=self.pad_id)
    return tf.ensure_shape(ids, [max_len])

  def __repr__(self):
    return "ByteTokenizer()"


class SentencePieceTokenizer(Tokenizer):
  """SentencePiece model from a local file; ids are the model's ids as is.

  eos_id is the model's EOS id (must be >= 1); pad is always 0. Note that
  SentencePiece's <unk> is usually id 0 as well, so unknown pieces look like
  padding. That is harmless here: towers pool at the last non-pad token,
  which is always EOS, and attention masks only matter after EOS.

  In tf.data the model runs through `tf.numpy_function` (no tensorflow_text
  here), so it holds the GIL and the graph cannot be serialized.
  """

  def __init__(self, model_path: str):
    # Deferred import: only needed when an SP tokenizer is actually used.
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(model_path):
      raise FileNotFoundError(
          f"SentencePiece model file not found: {model_path!r} (local paths "
          "only).")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 1:
      raise ValueError(
          f"SentencePiece model {model_path!r} has eos_id={self.eos_id}; need "
          "an EOS piece with id >= 1 (id 0 is reserved for padding).")
    self.vocab_size = int(self._sp.get_piece_size())

  def _encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def _decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def tokenize_tf(self, text: tf.Tensor, max_len: int) -> tf.Tensor:
    max_len = _check_max_len(max_len)

    def _np_tokenize(s):
      return _finalize(self._encode(_as_str(s)), max_len, self.eos_id)

    ids = tf.numpy_function(_np_tokenize, [_check_scalar(text)], tf.int32,
                            stateful=False, name="sentencepiece_tokenize")
    return tf.ensure_shape(ids, [max_len])

  def __repr__(self):
    return f"SentencePieceTokenizer({self.model_path!r})"


def _bytes_to_unicode() -> dict[int, str]:
  """CLIP's reversible byte -> printable character table (GPT-2's)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1)]
  cs, n = list(bs), 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _clip_word_regex(specials: Sequence[str]):
  """CLIP's pre-tokenizer: specials, English contractions, letter runs, single digits, other runs.

  Uses the `regex` package (\\p{L}, \\p{N}) as CLIP does when it is installed; otherwise an
  stdlib approximation that differs only on rare numerals (e.g. superscripts count as letters).
  """
  head = "|".join(specials) + r"|'s|'t|'re|'ve|'m|'ll|'d|"
  try:
    import regex  # pylint: disable=g-import-not-at-top
    return regex.compile(head + r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
  except ImportError:
    import re  # pylint: disable=g-import-not-at-top
    return re.compile(head + r"[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class ClipBpeTokenizer(Tokenizer):
  """OpenAI CLIP's byte-level BPE, from a merges file the user gives (no download).

  The file is open_clip's `bpe_simple_vocab_16e6.txt.gz` format (gzip or plain text): a header
  line, then one merge per line; like CLIP, at most the first 48,894 are used. Ids: 256 byte
  symbols, the same with '</w>', one per merge, then <start_of_text> and <end_of_text> (the
  largest id, so pooling at the argmax token is pooling at EOT). Text is cleaned as CLIP's
  default: ftfy.fix_text when ftfy is installed, HTML unescaped twice, whitespace collapsed,
  lowercased. Rows are [SOT, tokens..., EOT] truncated keeping EOT last and padded with 0,
  exactly open_clip's `tokenize` (tests/test_convert.py checks this against open_clip's ids).
  """

  def __init__(self, vocab_path: str):
    if not os.path.isfile(vocab_path):
      raise FileNotFoundError(
          f"CLIP BPE vocab file not found: {vocab_path!r} (local paths only; open_clip ships "
          "it as open_clip/bpe_simple_vocab_16e6.txt.gz).")
    import gzip  # pylint: disable=g-import-not-at-top
    opener = gzip.open if vocab_path.endswith(".gz") else open
    with opener(vocab_path, "rb") as f:
      lines = f.read().decode("utf-8").split("\n")
    # CLIP's slice, empty lines included, so ids match open_clip's for any file.
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    self.vocab_path = vocab_path
    self._byte_encoder = _bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    symbols = list(self._byte_encoder.values())
    specials = ["<start_of_text>", "<end_of_text>"]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + specials
    self._encoder = {piece: i for i, piece in enumerate(vocab)}
    self._decoder = {i: piece for piece, i in self._encoder.items()}
    self._ranks = {m: i for i, m in enumerate(merges)}
    self._cache = {s: s for s in specials}
    self._pattern = _clip_word_regex(specials)
    self.sot_id, self.eos_id = (self._encoder[s] for s in specials)
    self.vocab_size = self.eos_id + 1  # Rows of the embedding table (ids may repeat pieces).

  @staticmethod
  def clean(text: str) -> str:
    try:
      import ftfy  # pylint: disable=g-import-not-at-top
      text = ftfy.fix_text(text)
    except ImportError:
      pass
    import html  # pylint: disable=g-import-not-at-top
    return " ".join(html.unescape(html.unescape(text)).split()).lower()

  def _bpe(self, token: str) -> str:
    """Space-separated BPE pieces of one pre-token (its last symbol carries '</w>')."""
    if token in self._cache:
      return self._cache[token]
    word = (*token[:-1], token[-1] + "</w>")
    while len(word) > 1:
      pairs = set(zip(word[:-1], word[1:]))
      best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(word):  # Merge every (non-overlapping) occurrence, left to right.
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    self._cache[token] = " ".join(word)
    return self._cache[token]

  def _encode(self, text: str) -> list[int]:
    ids = [self.sot_id]
    for token in self._pattern.findall(self.clean(text)):
      token = "".join(self._byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self._encoder[piece] for piece in self._bpe(token).split(" "))
    return ids

  def _decode(self, ids: list[int]) -> str:
    text = "".join(self._decoder[i] for i in ids if i != self.sot_id and i in self._decoder)
    data = bytearray(self._byte_decoder[c] for c in text if c in self._byte_decoder)
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def tokenize_tf(self, text: tf.Tensor, max_len: int) -> tf.Tensor:
    max_len = _check_max_len(max_len)

    def _np_tokenize(s):
      return _finalize(self._encode(_as_str(s)), max_len, self.eos_id)

    ids = tf.numpy_function(_np_tokenize, [_check_scalar(text)], tf.int32,
                            stateful=False, name="clip_bpe_tokenize")
    return tf.ensure_shape(ids, [max_len])

  def __repr__(self):
    return f"ClipBpeTokenizer({self.vocab_path!r})"


@functools.lru_cache(maxsize=None)
def get_tokenizer(spec: str) -> Tokenizer:
  """Returns a (cached) tokenizer: 'bytes', 'sp:/path/to/model.model' (SentencePiece, e.g.
  SigLIP's) or 'clip_bpe:/path/to/bpe_simple_vocab_16e6.txt.gz' (CLIP's BPE)."""
  if spec == "bytes":
    return ByteTokenizer()
  if isinstance(spec, str) and spec.startswith("sp:") and len(spec) > 3:
    return SentencePieceTokenizer(spec[len("sp:"):])
  if isinstance(spec, str) and spec.startswith("clip_bpe:") and len(spec) > 9:
    return ClipBpeTokenizer(spec[len("clip_bpe:"):])
  raise ValueError(
      f"Unknown tokenizer spec {spec!r}; valid forms: 'bytes', "
      "'sp:/path/to/model.model' or 'clip_bpe:/path/to/bpe_simple_vocab_16e6.txt.gz'.")
