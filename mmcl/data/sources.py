"""Data sources beside TFDS: webdataset tar shards and CSV/TSV files of images and captions.

Names (`config.input.name`, an evaluator's `dataset`):
  'wds:/data/shards-*.tar'   webdataset shards as img2dataset writes them: samples are the
                             tar members sharing a key, `KEY.jpg|jpeg|png|webp` (image),
                             `KEY.txt` (caption), `KEY.json` (metadata, kept as a string),
                             `KEY.cls` (a class index, read when a label is asked for);
  'csv:/data/train.csv'      open_clip's format: a header row with `filepath` and `title`
                             columns, tab-separated whatever the extension (open_clip's
                             `--csv-separator` default); options in csv_files.py.
Both yield `{'image': encoded bytes, 'captions': [caption]}` (plus `json` for webdataset),
the fields of `mmcl_shapes`, so the same pp strings apply; with the option `label_key`
also `{label_key: class index}` (a CSV column; a webdataset's `.cls`, else that key of its
`.json`), which the zero-shot and probe evaluators read.

Samples are indexed once (tar headers and CSV rows only, no image is read) into numpy
arrays of (file, offsets), and a dataset of row numbers is read lazily by `read`, so a
process reads only its own share, and a training stream shuffles row numbers, not image
bytes (the shuffle buffer is most of the saved data state). Nothing here is fatal for one
bad shard or record: a truncated or unreadable tar keeps the samples before the damage, a
CSV row that is not UTF-8 or not CSV is left out, a file that cannot be read at training
time yields empty bytes (dropped by `decode`, counted); each is counted and named in the
log (`skipped.SKIPPED`).
"""
import glob
import io
import json
import posixpath
import re
import tarfile

import numpy as np
import tensorflow as tf

from mmcl.data import csv_files, skipped

PREFIXES = ('wds:', 'csv:')
_IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')


def is_file_source(name: str) -> bool:
  return name.startswith(PREFIXES)


def check_name(name: str):
  """Refuses a name with an unknown scheme (`cvs:/x.tsv`) before TFDS misreads it."""
  scheme, sep, rest = name.partition(':')
  # A TFDS name may end in ':VERSION' (digits, dots, '*'); anything else is a scheme typo.
  if sep and not is_file_source(name) and not re.fullmatch(r'[\d.*]+', rest):
    raise ValueError(
        f'Unknown data source {name!r}: {scheme + ":"!r} is not a source scheme. Valid: '
        "'csv:/path/train.csv' (or .tsv: image paths and captions), "
        "'wds:/path/shards-*.tar' (webdataset), or a TFDS name "
        "'dataset[/config][:version]' (e.g. 'mmcl_shapes/tiny').")


def _remote(path: str) -> bool:
  return '://' in path


_BRACES = re.compile(r'\{([^{}]*)\}')


def expand_braces(pattern: str) -> list[str]:
  """webdataset's shard lists: '{00000..00009}' (a zero-padded range, as img2dataset names
  shards) and '{a,b}' alternatives, expanded left to right; globs are left to glob."""
  m = _BRACES.search(pattern)
  if m is None:
    return [pattern]
  body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
  lo, sep, hi = body.partition('..')
  if sep and lo.isdigit() and hi.isdigit():
    width = len(lo) if lo.startswith('0') else 0
    step = 1 if int(hi) >= int(lo) else -1
    parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  elif ',' in body:
    parts = body.split(',')
  else:  # Not a list: literal braces.
    return [head + '{' + body + '}' + t for t in expand_braces(tail)]
  return [head + p + t for p in parts for t in expand_braces(tail)]


def _files(pattern: str) -> list[str]:
  glob_fn = tf.io.gfile.glob if _remote(pattern) else glob.glob
  files = sorted({f for p in expand_braces(pattern) for f in glob_fn(p)})
  if not files:
    raise FileNotFoundError(f'No files match {pattern!r}.')
  return files


def _index_tar(path: str) -> dict:
  """{key: {field: (offset, size)}} of one shard from its 512-byte headers. A truncated or
  corrupt shard keeps the members before the damage; an unreadable one gives none."""
  samples, last = {}, None
  try:
    with csv_files.open_file(path) as f:
      f.seek(0, io.SEEK_END)
      size = f.tell()
      f.seek(0)
      with tarfile.open(fileobj=f) as tar:
        for member in tar:
          if not member.isfile():
            continue
          if member.offset_data + member.size > size:
            raise tarfile.ReadError(f'member {member.name!r} ends past the end of the file '
                                    f'({size} bytes): truncated')
          key, _, ext = member.name.rpartition('.')
          field = 'image' if ext.lower() in _IMAGE_EXTS else ext.lower()
          samples.setdefault(key, {})[field] = (member.offset_data, member.size)
          last = member.name
  except (tarfile.TarError, OSError, tf.errors.OpError) as e:
    where = f'{path} after member {last!r}' if last else path
    skipped.SKIPPED.skip('bad_shard', where, f'{type(e).__name__}: {e}; kept the '
                         f'{len(samples)} samples before it')
  return samples


def _webdataset(pattern: str, opts: dict):
  """(rows, read) of webdataset shards; rows are sample numbers into numpy arrays of the
  shard, key and member byte ranges (image, txt, json, cls)."""
  shards, rows, keys, ranges = _files(pattern), [], [], []
  for s, path in enumerate(shards):
    samples = _index_tar(path)
    for key in sorted(samples):
      fields = samples[key]
      if 'image' not in fields or (opts['captions'] and 'txt' not in fields):
        skipped.SKIPPED.skip('incomplete_sample', f'{path} member {key}',
                             'no image' + (' or no caption' if opts['captions'] else ''))
        continue
      rows.append(s)
      keys.append(key.encode('utf-8', 'surrogateescape'))
      ranges.append([n for f in ('image', 'txt', 'json', 'cls') for n in fields.get(f, (0, 0))])
  if not rows:
    raise ValueError(f'{pattern} holds no complete sample (image'
                     f'{" and caption" if opts["captions"] else ""}); '
                     f'skipped: {skipped.SKIPPED.describe() or "none"}.')
  # The whole index, as arrays: the per-shard dicts and lists above are freed here.
  shard_of, keys = np.asarray(rows, np.int32), np.asarray(keys)
  ranges = np.asarray(ranges, np.int64).reshape(-1, 8)
  del rows
  label_key = opts['label_key']

  def read_sample(i):
    path, key = shards[shard_of[i]], keys[i].decode('utf-8', 'surrogateescape')
    image, caption, meta, cls = _read_member(path, key, ranges[i])
    label = -1
    if label_key is not None and image:
      label = _label(cls, meta, label_key, f'{path} member {key}')
      image = image if label >= 0 else b''  # Unlabelled: dropped (and counted) by `decode`.
    return image, caption, meta, np.int64(label)

  def read(i):
    image, caption, meta, label = tf.numpy_function(
        read_sample, [i], [tf.string] * 3 + [tf.int64], stateful=False)
    for t in (image, caption, meta, label):
      t.set_shape([])
    sample = {'image': image, 'json': meta}
    if opts['captions']:
      sample['captions'] = tf.strings.strip(caption)[None]
    if label_key is not None:
      sample[label_key] = label
    return sample

  return tf.data.Dataset.range(len(shard_of)), read


def _label(cls: bytes, meta: bytes, label_key: str, where: str) -> int:
  """A sample's class index: its `.cls` member (a decimal integer), else `label_key` of
  its `.json`; -1 (skipped and counted) if neither holds one."""
  try:
    if cls:
      value = cls.decode().strip()
    else:
      value = json.loads(meta).get(label_key) if meta else None
      if value is None:
        raise ValueError(f'no .cls member and no {label_key!r} in its .json')
    if isinstance(value, bool) or not str(value).isdigit():
      raise ValueError(f'label {value!r} is not a class index (an integer >= 0)')
    return int(value)
  except (ValueError, UnicodeDecodeError, AttributeError) as e:
    skipped.SKIPPED.skip('bad_label', where, e)
    return -1


def _read_member(path, key, ranges) -> tuple[bytes, ...]:
  """The byte ranges (offset, size, offset, size, ...) of one sample; b'' for each if the
  file cannot be read now (moved, truncated since indexing, a remote hiccup)."""
  try:
    out = []
    with csv_files.open_file(path) as f:
      for offset, size in zip(ranges[::2], ranges[1::2]):
        f.seek(int(offset))
        data = f.read(int(size)) if size else b''
        if len(data) != size:
          raise OSError(f'read {len(data)} of {size} bytes at {offset} (truncated?)')
        out.append(data)
    return tuple(out)
  except (OSError, tf.errors.OpError) as e:
    skipped.SKIPPED.skip('unreadable', f'{path} member {key}', e)
    return (b'',) * (len(ranges) // 2)


def options(given=None) -> dict:
  """The options of a file source, checked: csv_files.DEFAULTS updated with `given`;
  webdataset reads `captions` and `label_key` (its `.cls` member, else that key of its
  `.json`)."""
  return csv_files.options(given)


def short_name(name: str) -> str:
  """A metric name for a file source: 'csv:/data/held_out.csv' -> 'held_out', and
  'wds:/data/digits/test-*.tar' -> 'digits' (the directory when the file name is a glob)."""
  path = name.partition(':')[2].rstrip('/')
  base = posixpath.basename(path)
  if glob.has_magic(base):
    base = posixpath.basename(posixpath.dirname(path)) or base
  return base.split('.')[0] or name


def file_source(name: str, process_index: int, process_count: int, opts=None):
  """(rows, read): this process's share of the rows of source `name` (every
  process_count-th sample), and the tf function that reads a row into its sample.
  `opts`: the source's options (see `options`)."""
  kind, _, path = name.partition(':')
  opts = options(opts)
  ds, read = _webdataset(path, opts) if kind == 'wds' else csv_files.source(path, opts)
  return ds.shard(process_count, process_index), read


def file_dataset(name: str, process_index: int, process_count: int,
                 opts=None) -> tf.data.Dataset:
  """This process's share of the samples of `name`, in order."""
  rows, read = file_source(name, process_index, process_count, opts)
  return rows.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
