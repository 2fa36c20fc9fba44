"""Data sources beside TFDS: webdataset tar shards and CSV/TSV files of images and captions.

Names (`config.input.name`):
  'wds:/data/shards-*.tar'   webdataset shards as img2dataset writes them: samples are the
                             tar members sharing a key, `KEY.jpg|jpeg|png|webp` (image),
                             `KEY.txt` (caption), `KEY.json` (metadata, kept as a string);
  'csv:/data/train.tsv'      open_clip's format: a header row with `filepath` and `title`
                             columns (tab-separated for .tsv, comma otherwise); image paths
                             are relative to the file's directory unless absolute.
Both yield `{'image': encoded bytes, 'captions': [caption]}` (plus `json` for webdataset),
the fields of `mmcl_shapes`, so the same pp strings apply. Samples are indexed once (tar
headers and CSV rows only, no image is read) and then read lazily, so a process reads only
its own share. A sample without an image or a caption is left out of the index (counted in
the log); a corrupt image fails in `decode` and is dropped by the pipeline (counted).
"""
import csv
import glob
import os
import tarfile

from absl import logging
import numpy as np
import tensorflow as tf

PREFIXES = ('wds:', 'csv:')
_IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')


def is_file_source(name: str) -> bool:
  return name.startswith(PREFIXES)


def _files(pattern: str) -> list[str]:
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f'No files match {pattern!r}.')
  return files


def _index_webdataset(pattern: str):
  """(tar path, image offset, image size, caption offset, caption size, json...) per sample."""
  rows, incomplete = [], 0
  for path in _files(pattern):
    samples = {}
    with tarfile.open(path) as tar:  # Reads the 512-byte headers only.
      for member in tar:
        if not member.isfile():
          continue
        key, _, ext = member.name.rpartition('.')
        field = 'image' if ext.lower() in _IMAGE_EXTS else ext.lower()
        samples.setdefault(key, {})[field] = (member.offset_data, member.size)
    for key in sorted(samples):
      fields = samples[key]
      if 'image' not in fields or 'txt' not in fields:
        incomplete += 1
        continue
      rows.append((path, *fields['image'], *fields['txt'], *fields.get('json', (0, 0))))
  if incomplete:
    logging.warning('%s: %d samples without an image or a caption left out.', pattern,
                    incomplete)
  return rows


def _read_range(path, offset, size) -> bytes:
  if size == 0:
    return b''
  with open(path.decode() if isinstance(path, bytes) else path, 'rb') as f:
    f.seek(int(offset))
    return f.read(int(size))


def webdataset(pattern: str) -> tf.data.Dataset:
  rows = _index_webdataset(pattern)
  paths, *ranges = zip(*rows)
  ds = tf.data.Dataset.from_tensor_slices(
      (list(paths), *[np.asarray(r, np.int64) for r in ranges]))

  def read(path, img_off, img_len, txt_off, txt_len, json_off, json_len):
    def fetch(p, o, n):
      return tf.numpy_function(_read_range, [p, o, n], tf.string, stateful=False)
    image = fetch(path, img_off, img_len)
    caption = tf.strings.strip(fetch(path, txt_off, txt_len))
    image.set_shape([])
    caption.set_shape([])
    return {'image': image, 'captions': caption[None],
            'json': tf.ensure_shape(fetch(path, json_off, json_len), [])}

  return ds.map(read)


def csv_dataset(path: str, image_key: str = 'filepath', caption_key: str = 'title'):
  delimiter = '\t' if path.endswith('.tsv') else ','
  with open(path, newline='') as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    missing = {image_key, caption_key} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f'{path} has no column(s) {sorted(missing)}; columns: '
                       f'{reader.fieldnames}.')
    rows = [(r[image_key], r[caption_key]) for r in reader if r[image_key] and r[caption_key]]
  root = os.path.dirname(os.path.abspath(path))
  images = [p if os.path.isabs(p) else os.path.join(root, p) for p, _ in rows]
  ds = tf.data.Dataset.from_tensor_slices((images, [c for _, c in rows]))
  return ds.map(lambda image, caption: {'image': tf.io.read_file(image),
                                        'captions': caption[None]})


def file_dataset(name: str, process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's share of the source `name` (every process_count-th sample)."""
  kind, _, path = name.partition(':')
  ds = webdataset(path) if kind == 'wds' else csv_dataset(path)
  return ds.shard(process_count, process_index)
