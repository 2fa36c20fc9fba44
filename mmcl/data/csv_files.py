"""CSV/TSV files of image paths, captions and labels, in open_clip's conventions.

Options (`config.input.csv`, an evaluator's `csv=dict(...)`; None keeps the default):
  separator    '\t' whatever the file's extension (open_clip's `--csv-separator` default),
               one character, a name ('tab', 'comma', 'semicolon', 'pipe', 'space') or
               'sniff' (guessed from the header among tab , ; |);
  img_key      the image path column, 'filepath' (open_clip's `--csv-img-key`);
  caption_key  the caption column, 'title' (open_clip's `--csv-caption-key`);
  label_key    a column of integer class indices, read when set (evaluators set theirs);
  root         the directory relative image paths resolve against: None = the CSV's own
               directory (files move with their CSV), '.' = the working directory
               (open_clip's way: it opens the paths as written). A first image found
               only from the working directory is an error saying to set root='.'.
  captions     False for readers of labels only (zero-shot, probe): no caption column needed.

A file is indexed once into numpy arrays of each usable row's byte offset, size and line
number (24 bytes a row, whatever the captions: no Python list of rows), and `read` seeks
to one row and parses it again, so the training stream shuffles row numbers only. (200k rows
of 100 bytes: 0.6 s and a 5 MB peak on one core; the Python lists of rows and the text this
replaced peaked at 205 MB.)
Quoting follows Python's csv module (a quoted field may hold the separator or a newline).
"""
import array
import csv
import io
import itertools
import os
import posixpath

import numpy as np
import tensorflow as tf

from mmcl.data import skipped

DEFAULTS = dict(separator='\t', img_key='filepath', caption_key='title', label_key=None,
                root=None, captions=True)
_NAMED = {'tab': '\t', 'comma': ',', 'semicolon': ';', 'pipe': '|', 'space': ' '}
_SNIFFED = '\t,;|'
_WHERE = ('config.input.csv.<option> for training, an evaluator\'s csv=dict(<option>=...) '
          'or a zero-shot dataset entry\'s csv')


def options(given=None) -> dict:
  """DEFAULTS updated with the options `given` (a None value keeps the default), checked."""
  given = dict(given.items() if given is not None else ())
  unknown = set(given) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'Unknown CSV option(s) {sorted(unknown)}; valid: {list(DEFAULTS)}.')
  opts = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
  sep = _NAMED.get(opts['separator'], opts['separator'])
  if sep != 'sniff' and not (isinstance(sep, str) and len(sep) == 1 and sep not in '"\r\n'):
    raise ValueError(
        f'CSV separator {opts["separator"]!r} is not valid: give one character (open_clip\'s '
        f'--csv-separator; default tab), one of {sorted(_NAMED)}, or \'sniff\' (guessed from '
        f'the header among {_SNIFFED!r}).')
  for key in ('img_key', 'caption_key', 'label_key', 'root'):
    if opts[key] is not None and not isinstance(opts[key], str):
      raise ValueError(f'CSV option {key}={opts[key]!r} must be a string.')
  return {**opts, 'separator': sep}


class _Lines:
  """The decoded lines of a binary file, and the byte position after the last one given
  (csv.reader pulls exactly the lines of one record before yielding it)."""

  def __init__(self, f):
    self.f, self.pos = f, f.tell()

  def __iter__(self):
    return self

  def __next__(self) -> str:
    raw = self.f.readline()
    if not raw:
      raise StopIteration
    self.pos += len(raw)
    return raw.decode('utf-8', 'surrogateescape')  # A bad byte fails its row only.


def _separator(path: str, header: str, sep: str) -> str:
  if sep != 'sniff':
    return sep
  try:
    return csv.Sniffer().sniff(header, delimiters=_SNIFFED).delimiter
  except csv.Error as e:
    raise ValueError(f'{path}: no separator among {_SNIFFED!r} found in the header '
                     f'{header.strip()!r} ({e}); set the separator '
                     f'({_WHERE.replace("<option>", "separator")}).') from e


def _columns(path: str, columns: list[str], sep: str, opts: dict) -> dict:
  """{'image'|'caption'|'label': column position} of the columns `opts` asks for."""
  want = {'image': ('img_key', opts['img_key'])}
  if opts['captions']:
    want['caption'] = ('caption_key', opts['caption_key'])
  if opts['label_key'] is not None:
    want['label'] = ('label_key', opts['label_key'])
  missing = [name for _, name in want.values() if name not in columns]
  if missing:
    hint = ''
    if len(columns) == 1:
      found = [s for s in _SNIFFED if s != sep and s in columns[0]]
      if found:
        hint = (f' The header splits into one column with separator {sep!r}: is it '
                f'{found[0]!r}? Set separator={found[0]!r} or \'sniff\'.')
    options_ = ', '.join(f'{o}={n!r}' for o, n in want.values())
    raise ValueError(f'{path} has no column(s) {sorted(missing)}; columns: {columns}.{hint} '
                     f'The columns read are {options_}; name yours with these options '
                     f'({_WHERE}).')
  return {field: columns.index(name) for field, (_, name) in want.items()}


def _not_utf8(value: str) -> str | None:
  """Why `value` (decoded with surrogateescape) is not UTF-8, or None if it is."""
  try:
    value.encode('utf-8')
    return None
  except UnicodeEncodeError as e:
    return (f'byte 0x{ord(value[e.start]) - 0xdc00:02x} at character {e.start} is not '
            'UTF-8')


def _fields(row: list[str], cols: dict) -> dict:
  return {f: (row[i] if i < len(row) else '') for f, i in cols.items()}


def _problem(fields: dict, opts: dict) -> tuple[str, str] | None:
  """(reason, cause) if a row's fields are unusable, else None."""
  if not fields['image'] or ('caption' in fields and not fields['caption']):
    what = opts['img_key'] + (f' or no {opts["caption_key"]}' if 'caption' in fields else '')
    return 'incomplete_row', f'no {what}'
  bad = next(filter(None, (_not_utf8(v) for v in fields.values())), None)
  if bad:
    return 'not_utf8', bad
  if 'label' in fields and not fields['label'].strip().isdigit():
    return 'bad_label', (f'{opts["label_key"]} {fields["label"]!r} is not a class index '
                         '(an integer >= 0)')
  return None


def open_file(path: str):
  """A local or remote (gs://...) file, binary."""
  if '://' in path:
    from mmcl import fs  # pylint: disable=g-import-not-at-top
    return fs.open(path, 'rb')
  return open(path, 'rb')


def index(path: str, opts: dict):
  """(offsets, sizes, lines: int64 arrays of the usable rows, separator, column positions)."""
  offsets, sizes, line_nums = array.array('q'), array.array('q'), array.array('q')
  with open_file(path) as f:
    lines = _Lines(f)
    header = next(lines, '')
    sep = _separator(path, header, opts['separator'])
    reader = csv.reader(itertools.chain([header], lines), delimiter=sep)
    cols = _columns(path, next(reader, []), sep, opts)
    start = lines.pos
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:
        skipped.SKIPPED.skip('bad_row', f'{path} line {reader.line_num}', e)
        start = lines.pos
        continue
      end, where = lines.pos, f'{path} line {reader.line_num}'
      if row:  # Blank lines are no rows (as csv.DictReader, and pandas, read them).
        problem = _problem(_fields(row, cols), opts)
        if problem:
          skipped.SKIPPED.skip(problem[0], where, problem[1])
        else:
          offsets.append(start)
          sizes.append(end - start)
          line_nums.append(reader.line_num)
      start = end
  arrays = [np.frombuffer(a, np.int64) if len(a) else np.zeros(0, np.int64)
            for a in (offsets, sizes, line_nums)]
  return (*arrays, sep, cols)


def _root(path: str, root) -> str:
  if root is not None:
    return root
  return posixpath.dirname(path) if '://' in path else os.path.dirname(os.path.abspath(path))


def _resolve(image: str, root: str) -> str:
  if os.path.isabs(image) or '://' in image:
    return image
  return posixpath.join(root, image) if '://' in root else os.path.join(root, image)


def _check_root(path: str, first: str, written: str, opts: dict):
  """A CSV written for open_clip, whose relative paths start from the working directory
  rather than the CSV's: the first image says so (one stat, local files only)."""
  if (opts['root'] is None and '://' not in first and not os.path.exists(first)
      and os.path.exists(written)):
    raise ValueError(
        f'{path}: image {written!r} of its first row is not in the CSV\'s directory '
        f'({first} does not exist) but is in the working directory, as open_clip reads '
        f'paths: set root=\'.\' ({_WHERE.replace("<option>", "root")}).')


def source(path: str, given_options=None):
  """(rows, read): a dataset of row numbers, and the tf function reading one into its
  sample {'image': file bytes, 'captions': [caption], <label_key>: int64}."""
  opts = options(given_options)
  offsets, sizes, line_nums, sep, cols = index(path, opts)
  if not len(offsets):
    raise ValueError(f'{path} has no usable row; skipped: '
                     f'{skipped.SKIPPED.describe() or "none"}.')
  root = _root(path, opts['root'])

  def row_fields(i) -> dict:
    with open_file(path) as f:
      f.seek(int(offsets[i]))
      text = f.read(int(sizes[i])).decode('utf-8', 'surrogateescape')
    return _fields(next(csv.reader(io.StringIO(text, newline=''), delimiter=sep)), cols)

  _check_root(path, _resolve(row_fields(0)['image'], root), row_fields(0)['image'], opts)

  def read_row(i):
    where = f'{path} line {line_nums[i]}'
    try:
      fields = row_fields(i)
    except (OSError, tf.errors.OpError, csv.Error, StopIteration) as e:
      skipped.SKIPPED.skip('unreadable', where, e)  # Changed since it was indexed.
      return b'', b'', np.int64(-1)
    image = _resolve(fields['image'], root)
    try:
      with open_file(image) as f:
        image_bytes = f.read()
    except (OSError, tf.errors.OpError) as e:
      skipped.SKIPPED.skip('unreadable', f'{where}: {image}', e)
      image_bytes = b''
    return (image_bytes, fields.get('caption', '').encode('utf-8'),
            np.int64(int(fields.get('label', '-1'))))

  def read(i):
    image, caption, label = tf.numpy_function(read_row, [i], [tf.string, tf.string, tf.int64],
                                              stateful=False)
    image.set_shape([])
    sample = {'image': image}
    if 'caption' in cols:
      caption.set_shape([])
      sample['captions'] = caption[None]
    if 'label' in cols:
      label.set_shape([])
      sample[opts['label_key']] = label
    return sample

  return tf.data.Dataset.range(len(offsets)), read
