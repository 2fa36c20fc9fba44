"""Webdataset shards, CSV files and mixtures of them train through the same pipeline."""
import io
import os
import tarfile

import numpy as np
import pytest

from configs import demo
from mmcl.data import input_pipeline
from mmcl.data.shapes import builder as shapes_builder
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib

N = 24  # Samples per source; sample 5 has corrupt image bytes.


def _image(i):
  rng = np.random.default_rng(i)
  return shapes_builder.encode_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _payloads():
  for i in range(N):
    yield i, (b'garbage, not a png' if i == 5 else _image(i)), f'a picture number {i}'


@pytest.fixture(scope='module')
def wds_pattern(tmp_path_factory):
  root = tmp_path_factory.mktemp('wds')
  for shard in range(2):  # Two shards, as img2dataset writes them.
    with tarfile.open(root / f'{shard:05d}.tar', 'w') as tar:
      def add(name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      for i, image, caption in _payloads():
        if i % 2 == shard:
          add(f'{i:09d}.png', image)
          add(f'{i:09d}.txt', caption.encode())
          add(f'{i:09d}.json', b'{"similarity": 0.3}')
      add('999999999.txt', b'a caption without an image')  # Incomplete: left out.
  return f'wds:{root}/*.tar'


@pytest.fixture(scope='module')
def csv_name(tmp_path_factory):
  root = tmp_path_factory.mktemp('csv')
  os.makedirs(root / 'images')
  lines = ['filepath\ttitle']
  for i, image, caption in _payloads():
    (root / 'images' / f'{i}.png').write_bytes(image)
    lines.append(f'images/{i}.png\t{caption}')
  (root / 'train.tsv').write_text('\n'.join(lines) + '\n')
  return f'csv:{root}/train.tsv'


def _eval_examples(name):
  ds = input_pipeline.get_dataset(name=name, split='train', pp='decode|keep("image", "captions")',
                                  batch_size=64, train=False)
  return [b for b in ds.as_numpy_iterator()]


def _rows(captions):  # One caption per sample: dense, or ragged when batches vary.
  return captions.to_list() if hasattr(captions, 'to_list') else list(captions)


@pytest.mark.parametrize('source', ['wds', 'csv'])
def test_every_good_sample_once_and_corrupt_ones_dropped(source, wds_pattern, csv_name):
  (batch,) = _eval_examples(wds_pattern if source == 'wds' else csv_name)
  assert batch['image'].shape == (N - 1, 64, 64, 3)
  captions = sorted(c[0].decode() for c in _rows(batch['captions']))
  assert captions == sorted(f'a picture number {i}' for i in range(N) if i != 5)


def test_process_shares_are_disjoint_and_complete(wds_pattern):
  seen = []
  for index in range(3):
    ds = input_pipeline.get_dataset(name=wds_pattern, split='train', pp='keep("captions")',
                                    batch_size=30, train=False, process_index=index,
                                    process_count=3)
    seen += [c[0] for b in ds.as_numpy_iterator() for c in _rows(b['captions'])]
  assert len(seen) == len(set(seen)) == N


@pytest.mark.parametrize('which', ['wds', 'csv', 'mixture'])
def test_trains_from_file_sources(which, wds_pattern, csv_name, tmp_path):
  c = demo.get_config('tiny')
  c.progress_bar, c.total_steps, c.log_every, c.batch_size = False, 4, 1, 16
  c.input.shuffle_buffer = 8
  c.evals = {}
  if which == 'mixture':
    c.input.mixture = ((wds_pattern, 0.5), (csv_name, 0.5))
  else:
    c.input.name = wds_pattern if which == 'wds' else csv_name
  loop.run(c, str(tmp_path))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r['train/loss']) for r in rows)
  # 64 examples read from a 24-sample source (or two): the corrupt sample came by and
  # was dropped, and counted.
  assert rows[-1]['data/dropped_records'] >= 1


def test_missing_csv_column_is_a_clear_error(tmp_path):
  (tmp_path / 'x.csv').write_text('path,caption\na.png,hi\n')
  with pytest.raises(ValueError, match=r"no column\(s\) \['filepath', 'title'\]"):
    input_pipeline.get_dataset(name=f'csv:{tmp_path}/x.csv', split='train', pp='keep("image")',
                               batch_size=2, train=False)


def test_brace_shard_lists_expand_as_webdataset_names_them(tmp_path):
  from mmcl.data import sources as sources_lib  # pylint: disable=g-import-not-at-top
  assert sources_lib.expand_braces('d/{00008..00011}.tar') == [
      'd/00008.tar', 'd/00009.tar', 'd/00010.tar', 'd/00011.tar']
  assert sources_lib.expand_braces('{a,b}/{1..2}.tar') == ['a/1.tar', 'a/2.tar', 'b/1.tar',
                                                          'b/2.tar']
  assert sources_lib.expand_braces('x/{y}.tar') == ['x/{y}.tar']
  for i in range(12):
    (tmp_path / f'{i:05d}.tar').write_bytes(b'')
  got = sources_lib._files(str(tmp_path / '{00002..00004}.tar'))
  assert [os.path.basename(f) for f in got] == ['00002.tar', '00003.tar', '00004.tar']
  with pytest.raises(FileNotFoundError, match='No files match'):
    sources_lib._files(str(tmp_path / '{00020..00021}.tar'))
