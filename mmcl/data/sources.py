"""Data sources beside TFDS: webdataset tar shards and CSV/TSV files of images and captions.

Names (`config.input.name`):
  'wds:/data/shards-*.tar'   webdataset shards as img2dataset writes them: samples are the
                             tar members sharing a key, `KEY.jpg|jpeg|png|webp` (image),
                             `KEY.txt` (caption), `KEY.json` (metadata, kept as a string);
  'csv:/data/train.tsv'      open_clip's format: a header row with `filepath` and `title`
                             columns (tab-separated for .tsv, comma otherwise); image paths
                             are relative to the file's directory unless absolute.
Both yield `{'image': encoded bytes, 'captions': [caption]}` (plus `json` for webdataset),
the fields of `mmcl_shapes`, so the same pp strings apply.

Samples are indexed once (tar headers and CSV rows only, no image is read) into rows of
(file, offsets) and read lazily by `read`, so a process reads only its own share, and a
training stream shuffles the small rows, not image bytes (the shuffle buffer is most of
the saved data state). Nothing here is fatal for one bad shard or record: a truncated or
unreadable tar keeps the samples before the damage, a CSV row that is not UTF-8 or not
CSV is left out, a file that cannot be read at training time yields empty bytes (dropped
by `decode`, counted); each is counted and named in the log (`skipped.SKIPPED`).
"""
import csv
import glob
import io
import os
import posixpath
import re
import tarfile

import numpy as np
import tensorflow as tf

from mmcl.data import skipped

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
        "'csv:/path/train.tsv' (or .csv: image paths and captions), "
        "'wds:/path/shards-*.tar' (webdataset), or a TFDS name "
        "'dataset[/config][:version]' (e.g. 'mmcl_shapes/tiny').")


def _remote(path: str) -> bool:
  return '://' in path


def _open(path: str):
  if _remote(path):
    from mmcl import fs  # pylint: disable=g-import-not-at-top
    return fs.open(path, 'rb')
  return open(path, 'rb')


def _files(pattern: str) -> list[str]:
  files = sorted(tf.io.gfile.glob(pattern) if _remote(pattern) else glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f'No files match {pattern!r}.')
  return files


def _index_tar(path: str) -> dict:
  """{key: {field: (offset, size)}} of one shard from its 512-byte headers. A truncated or
  corrupt shard keeps the members before the damage; an unreadable one gives none."""
  samples, last = {}, None
  try:
    with _open(path) as f:
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


def _webdataset(pattern: str):
  rows = []
  for path in _files(pattern):
    samples = _index_tar(path)
    for key in sorted(samples):
      fields = samples[key]
      if 'image' not in fields or 'txt' not in fields:
        skipped.SKIPPED.skip('incomplete_sample', f'{path} member {key}',
                             'no image or no caption')
        continue
      rows.append((path, key, *fields['image'], *fields['txt'],
                   *fields.get('json', (0, 0))))
  if not rows:
    raise ValueError(f'{pattern} holds no complete sample (image and caption); '
                     f'skipped: {skipped.SKIPPED.describe() or "none"}.')
  paths, keys, *ranges = zip(*rows)
  ds = tf.data.Dataset.from_tensor_slices(
      (list(paths), list(keys), *[np.asarray(r, np.int64) for r in ranges]))

  def read(path, key, *ranges):
    image, caption, meta = tf.numpy_function(
        _read_member, [path, key, *ranges], [tf.string] * 3, stateful=False)
    image.set_shape([])
    caption.set_shape([])
    meta.set_shape([])
    return {'image': image, 'captions': tf.strings.strip(caption)[None], 'json': meta}

  return ds, read


def _read_member(path, key, *ranges) -> tuple[bytes, ...]:
  """The byte ranges (offset, size, offset, size, ...) of one sample; b'' for each if the
  file cannot be read now (moved, truncated since indexing, a remote hiccup)."""
  path = path.decode()
  try:
    out = []
    with _open(path) as f:
      for offset, size in zip(ranges[::2], ranges[1::2]):
        f.seek(int(offset))
        data = f.read(int(size)) if size else b''
        if len(data) != size:
          raise OSError(f'read {len(data)} of {size} bytes at {offset} (truncated?)')
        out.append(data)
    return tuple(out)
  except (OSError, tf.errors.OpError) as e:
    skipped.SKIPPED.skip('unreadable', f'{path} member {key.decode()}', e)
    return (b'',) * (len(ranges) // 2)


def _not_utf8(value: str) -> str | None:
  """Why `value` (decoded with surrogateescape) is not UTF-8, or None if it is."""
  try:
    value.encode('utf-8')
    return None
  except UnicodeEncodeError as e:
    return (f'byte 0x{ord(value[e.start]) - 0xdc00:02x} at character {e.start} is not '
            'UTF-8')


def _csv(path: str, image_key: str = 'filepath', caption_key: str = 'title'):
  delimiter = '\t' if path.endswith('.tsv') else ','
  with _open(path) as f:
    text = f.read().decode('utf-8', 'surrogateescape')  # A bad byte fails its row only.
  reader = csv.DictReader(io.StringIO(text, newline=''), delimiter=delimiter)
  missing = {image_key, caption_key} - set(reader.fieldnames or ())
  if missing:
    raise ValueError(f'{path} has no column(s) {sorted(missing)}; columns: '
                     f'{reader.fieldnames}.')
  root = posixpath.dirname(path) if _remote(path) else os.path.dirname(os.path.abspath(path))
  rows = []
  while True:
    try:
      r = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      skipped.SKIPPED.skip('bad_row', f'{path} line {reader.line_num}', e)
      continue
    where = f'{path} line {reader.line_num}'
    image, caption = r.get(image_key), r.get(caption_key)
    if not image or not caption:
      skipped.SKIPPED.skip('incomplete_row', where, f'no {image_key} or no {caption_key}')
      continue
    bad = _not_utf8(image) or _not_utf8(caption)
    if bad:
      skipped.SKIPPED.skip('not_utf8', where, bad)
      continue
    if not (os.path.isabs(image) or _remote(image)):
      image = posixpath.join(root, image) if _remote(root) else os.path.join(root, image)
    rows.append((image, caption, reader.line_num))
  if not rows:
    raise ValueError(f'{path} has no usable row; skipped: '
                     f'{skipped.SKIPPED.describe() or "none"}.')
  images, captions, lines = zip(*rows)
  ds = tf.data.Dataset.from_tensor_slices(
      (list(images), list(captions), np.asarray(lines, np.int64)))

  def read(image, caption, line):
    data = tf.numpy_function(lambda p, n: _read_file(p, f'{path} line {n}'),
                             [image, line], tf.string, stateful=False)
    data.set_shape([])
    return {'image': data, 'captions': caption[None]}

  return ds, read


def _read_file(path, where: str) -> bytes:
  path = path.decode()
  try:
    with _open(path) as f:
      return f.read()
  except (OSError, tf.errors.OpError) as e:
    skipped.SKIPPED.skip('unreadable', f'{where}: {path}', e)
    return b''


def file_source(name: str, process_index: int, process_count: int):
  """(rows, read): this process's share of the rows of source `name` (every
  process_count-th sample), and the tf function that reads a row into its sample."""
  kind, _, path = name.partition(':')
  ds, read = _webdataset(path) if kind == 'wds' else _csv(path)
  return ds.shard(process_count, process_index), read


def file_dataset(name: str, process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's share of the samples of `name`, in order."""
  rows, read = file_source(name, process_index, process_count)
  return rows.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
