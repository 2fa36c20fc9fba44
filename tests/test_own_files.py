"""Your own files: CSV/TSV in open_clip's conventions and labelled CSV / webdataset for the
zero-shot, probe and retrieval evaluators, with class names from a file."""
import io
import json
import os
import tarfile
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from mmcl.data import csv_files, skipped, sources, tokenizers
from mmcl.data.shapes import builder as shapes_builder
from mmcl.evaluate import predict, probe, retrieval, zeroshot
from mmcl.evaluate import prompts as prompts_lib
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import loop, validate

PP_IMG = 'decode|value_range(-1, 1)'
TEXT_LEN = 16
CLASSES = ('zero', 'one', 'two', 'three')


def _pixels(i, label=None, size=16):
  """A random image; with a label, channel `label % 3` is bright (a learnable class)."""
  x = np.random.default_rng(i).integers(0, 100, (size, size, 3), dtype=np.uint8)
  if label is not None:
    x[..., label % 3] += 120
  return x


def _write_images(root, n, labels=None, prefix='img'):
  os.makedirs(root / 'images', exist_ok=True)
  arrays = []
  for i in range(n):
    x = _pixels(1000 * len(prefix) + i, None if labels is None else labels[i])
    (root / 'images' / f'{prefix}{i}.png').write_bytes(shapes_builder.encode_png(x))
    arrays.append(x)
  return np.stack(arrays)


@pytest.fixture
def skips(monkeypatch):
  log = skipped.SkipLog()
  monkeypatch.setattr(skipped, 'SKIPPED', log)
  return log


def _samples(name, opts=None):
  return list(sources.file_dataset(name, 0, 1, opts).as_numpy_iterator())


# ------------------------------------------------------------ open_clip's CSV conventions


def test_tab_separated_csv_as_open_clip_writes_it(tmp_path):
  """open_clip's README: `filepath<TAB>title`, named .csv (was 'no column(s) ... columns:
  ['filepath\\ttitle\\tlabel']': .csv meant comma)."""
  _write_images(tmp_path, 3)
  lines = ['filepath\ttitle\tlabel'] + [f'images/img{i}.png\ta scan, digit {i}\t{i}'
                                        for i in range(3)]
  (tmp_path / 'train.csv').write_text('\n'.join(lines) + '\n')
  got = _samples(f'csv:{tmp_path}/train.csv')
  assert [s['captions'][0].decode() for s in got] == [f'a scan, digit {i}' for i in range(3)]
  assert got[1]['image'] == (tmp_path / 'images' / 'img1.png').read_bytes()
  assert 'label' not in got[0]  # Read only when asked for.


def test_comma_csv_with_its_own_column_names_and_quoting(tmp_path):
  _write_images(tmp_path, 4)
  rows = ['id,path,caption', '0,images/img0.png,plain', '1,images/img1.png,"a 12"" pizza, cut"',
          '2,images/img2.png,"two\nlines, ""quoted"""',
          '3,images/img3.png,a 12" pizza']  # A quote inside an unquoted field is a quote.
  (tmp_path / 'x.csv').write_text('\n'.join(rows) + '\n')
  opts = dict(separator=',', img_key='path', caption_key='caption')
  got = _samples(f'csv:{tmp_path}/x.csv', opts)
  assert [s['captions'][0].decode() for s in got] == [
      'plain', 'a 12" pizza, cut', 'two\nlines, "quoted"', 'a 12" pizza']
  assert [s['image'] for s in got] == [(tmp_path / 'images' / f'img{i}.png').read_bytes()
                                       for i in range(4)]
  # The same by name, and by sniffing the header.
  assert len(_samples(f'csv:{tmp_path}/x.csv', {**opts, 'separator': 'comma'})) == 4
  assert len(_samples(f'csv:{tmp_path}/x.csv', {**opts, 'separator': 'sniff'})) == 4


@pytest.mark.parametrize('sep', ['\t', ';', '|'])
def test_sniffed_separator(tmp_path, sep):
  _write_images(tmp_path, 2)
  rows = [f'images/img{i}.png{sep}caption {i}' for i in range(2)]
  (tmp_path / 'x.txt').write_text('\n'.join([f'filepath{sep}title'] + rows) + '\n')
  got = _samples(f'csv:{tmp_path}/x.txt', dict(separator='sniff'))
  assert [s['captions'][0] for s in got] == [b'caption 0', b'caption 1']


def test_root_option_resolves_paths_from_the_working_directory(tmp_path, monkeypatch):
  _write_images(tmp_path, 1)
  os.makedirs(tmp_path / 'lists')
  (tmp_path / 'lists' / 'x.csv').write_text('filepath\ttitle\nimages/img0.png\thi\n')
  monkeypatch.chdir(tmp_path)  # open_clip's way: paths as written, from the cwd.
  (got,) = _samples(f'csv:{tmp_path}/lists/x.csv', dict(root='.'))
  assert got['image'] == (tmp_path / 'images' / 'img0.png').read_bytes()
  # Default: the CSV's directory; its first image, found from the cwd instead, says so.
  with pytest.raises(ValueError, match=r"image 'images/img0.png' of its first row is not in "
                     r"the CSV's directory .* as open_clip reads paths: set root='.'"):
    _samples(f'csv:{tmp_path}/lists/x.csv')
  monkeypatch.chdir(tmp_path / 'lists')
  (missing,) = _samples(f'csv:{tmp_path}/lists/x.csv')  # Nowhere: dropped (and counted).
  assert missing['image'] == b''


def test_missing_column_names_the_columns_and_the_options(tmp_path):
  (tmp_path / 'x.csv').write_text('path,caption\na.png,hi\n')
  with pytest.raises(ValueError, match=(
      r"no column\(s\) \['filepath', 'title'\]; columns: \['path,caption'\]\. The header "
      r"splits into one column with separator '\\t': is it ','\? Set separator=',' or "
      r"'sniff'.*img_key='filepath', caption_key='title'.*config\.input\.csv")):
    _samples(f'csv:{tmp_path}/x.csv')
  with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]; columns: \['path', "
                     r"'caption'\].*label_key='label'"):
    _samples(f'csv:{tmp_path}/x.csv', dict(separator=',', img_key='path',
                                           caption_key='caption', label_key='label'))


def test_bad_options_are_refused_naming_the_valid_ones():
  with pytest.raises(ValueError, match=r"separator 'tabs' is not valid: give one character.*"
                     r"\['comma', 'pipe', 'semicolon', 'space', 'tab'\].*'sniff'"):
    sources.options(dict(separator='tabs'))
  with pytest.raises(ValueError, match=r"Unknown CSV option\(s\) \['sep'\]; valid: "
                     r"\['separator', 'img_key'"):
    sources.options(dict(sep=','))
  c = demo.get_config('tiny')
  c.input.csv.separator = ',,'
  with pytest.raises(ValueError, match=r"config.input.csv: CSV separator ',,' is not valid"):
    validate.validate(c)


def test_index_is_numpy_arrays_of_offsets_and_skips_are_counted(tmp_path, skips):
  _write_images(tmp_path, 4)
  rows = [b'filepath\ttitle\tlabel', b'images/img0.png\tzero\t0', b'',
          b'images/img1.png\tcaf\xe9\t1',  # Not UTF-8: skipped.
          b'images/img2.png\t\t2',  # No caption: skipped.
          b'images/img3.png\tthree\tthree']  # Not a class index: skipped when labelled.
  (tmp_path / 'x.tsv').write_bytes(b'\n'.join(rows) + b'\n')
  opts = csv_files.options(dict(label_key='label'))
  offsets, sizes, lines, sep, _ = csv_files.index(f'{tmp_path}/x.tsv', opts)
  for a in (offsets, sizes, lines):
    assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == (1,)
  data = (tmp_path / 'x.tsv').read_bytes()
  assert data[offsets[0]:offsets[0] + sizes[0]] == rows[1] + b'\n' and lines[0] == 2
  assert sep == '\t'
  assert skips.counts() == {'not_utf8': 1, 'incomplete_row': 1, 'bad_label': 1}
  assert f'{tmp_path}/x.tsv line 6: label \'three\' is not a class index' in skips.describe()
  rows, _ = sources.file_source(f'csv:{tmp_path}/x.tsv', 0, 1, dict(label_key='label'))
  assert rows.element_spec.dtype.name == 'int64' and rows.element_spec.shape == ()


def test_indexing_holds_no_row_lists_and_not_the_text(tmp_path):
  n = 5000
  with open(tmp_path / 'big.csv', 'w') as f:
    f.write('filepath\ttitle\n')
    for i in range(n):
      f.write(f'images/{i:08d}.jpg\ta photo of thing number {i}, a caption of some length\n')
  size = os.path.getsize(tmp_path / 'big.csv')
  tracemalloc.start()
  try:
    arrays = csv_files.index(f'{tmp_path}/big.csv', csv_files.options())[:3]
    kept, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert sum(a.nbytes for a in arrays) == 24 * n
  # The whole file's text, or a list of row tuples, would each be about `size` or more.
  assert kept < 1.2 * 24 * n and peak < 0.5 * size, (kept, peak, size)


# ---------------------------------------------------------------- labelled sources


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_labelled_csv_and_webdataset_cls_and_json(tmp_path, skips):
  labels = [2, 0, 3, 1]
  _write_images(tmp_path, 4)
  (tmp_path / 'l.csv').write_text('filepath\tdigit\n' + ''.join(
      f'images/img{i}.png\t{l}\n' for i, l in enumerate(labels)))  # No caption column.
  got = _samples(f'csv:{tmp_path}/l.csv', dict(label_key='digit', captions=False))
  assert [int(s['digit']) for s in got] == labels and 'captions' not in got[0]
  png = [(tmp_path / 'images' / f'img{i}.png').read_bytes() for i in range(4)]
  with tarfile.open(tmp_path / 'cls.tar', 'w') as tar:
    for i, l in enumerate(labels):
      _add(tar, f'{i:04d}.png', png[i])
      _add(tar, f'{i:04d}.cls', f'{l}\n'.encode())
  got = _samples(f'wds:{tmp_path}/cls.tar', dict(label_key='label', captions=False))
  assert [int(s['label']) for s in got] == labels and [s['image'] for s in got] == png
  with tarfile.open(tmp_path / 'json.tar', 'w') as tar:
    for i, l in enumerate(labels):
      _add(tar, f'{i:04d}.png', png[i])
      _add(tar, f'{i:04d}.txt', f'caption {i}'.encode())
      _add(tar, f'{i:04d}.json', json.dumps({'digit': l} if i != 3 else {}).encode())
  got = _samples(f'wds:{tmp_path}/json.tar', dict(label_key='digit'))
  assert [int(s['digit']) for s in got[:3]] == labels[:3]
  assert got[3]['image'] == b''  # No label: dropped by `decode`, and counted.
  assert skips.counts() == {'bad_label': 1}
  assert "json.tar member 0003: no .cls member and no 'digit' in its .json" in skips.describe()


def test_classnames_file(tmp_path):
  (tmp_path / 'names.txt').write_text('zero\none\n\ntwo \n')
  assert prompts_lib.classnames(str(tmp_path / 'names.txt'), None, 'label') == (
      'zero', 'one', 'two')
  with pytest.raises(ValueError, match=r"Unknown classnames source '/nowhere/n.txt' \(and no "
                     r"such file\).*a path to a file with one name a line"):
    prompts_lib.classnames('/nowhere/n.txt', None, 'label')
  with pytest.raises(ValueError, match=r"a file source has no class metadata: give classnames"):
    prompts_lib.classnames('tfds', None, 'label')


# ---------------------------------------------------------------- evaluators


class StubModel:
  """Image tower: a fixed projection of the pixels; text tower: summed token embeddings."""

  def __init__(self, dim=6):
    rng = np.random.default_rng(0)
    self.w_img = rng.normal(size=(16 * 16 * 3, dim)).astype(np.float32)
    self.w_txt = rng.normal(size=(tokenizers.get_tokenizer('bytes').vocab_size, dim)).astype(
        np.float32)

  def apply(self, variables, images, tokens, *, train):
    del variables, train
    zimg = None if images is None else images.reshape(len(images), -1) @ self.w_img
    ztxt = None if tokens is None else jnp.take(self.w_txt, tokens, axis=0).sum(axis=1)
    return zimg, ztxt


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.create_mesh([('data', -1)])


@pytest.fixture(scope='module')
def held_out(tmp_path_factory):
  """A labelled tab-separated CSV of 40 held-out images, and a class names file."""
  root = tmp_path_factory.mktemp('held_out')
  labels = np.random.default_rng(7).integers(0, len(CLASSES), 40)
  pixels = _write_images(root, len(labels), labels)
  (root / 'test.csv').write_text('filepath\ttitle\tlabel\n' + ''.join(
      f'images/img{i}.png\tdigit {CLASSES[l]}\t{l}\n' for i, l in enumerate(labels)))
  (root / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
  return root, pixels, labels


def test_zeroshot_on_a_labelled_csv_matches_brute_force(mesh, held_out):
  root, pixels, labels = held_out
  model = StubModel()
  templates = ['a scan of the digit {}.', '{}']
  ev = zeroshot.ZeroShotEvaluator(
      predict.Predictor(model, mesh), dataset=f'csv:{root}/test.csv', pp_img=PP_IMG,
      classnames=str(root / 'classes.txt'), prompts=templates, tokenizer='bytes',
      text_len=TEXT_LEN, batch_size=16)
  got = ev.run({})
  # numpy brute force: pixels as written, prompts tokenized, ensembling by hand.
  tok = tokenizers.get_tokenizer('bytes')
  zimg = (pixels.reshape(len(pixels), -1) / 127.5 - 1.0) @ model.w_img.astype(np.float64)
  classifier = []
  for c in CLASSES:
    z = model.w_txt.astype(np.float64)[tok.tokenize([t.format(c) for t in templates],
                                                    TEXT_LEN)].sum(axis=1)
    classifier.append(_unit(_unit(z).mean(axis=0)))
  logits = _unit(zimg) @ np.stack(classifier).T
  top1 = float(np.mean(np.argmax(logits, axis=1) == labels))
  assert got == {'zeroshot/test/top1': pytest.approx(top1, abs=1e-9),
                 'zeroshot/test/top5': 1.0}  # 4 classes: always in the top 5.
  assert 0 < top1 < 1
  # Labels read in the file's order: a shuffled reading would score differently.
  assert top1 != float(np.mean(np.argmax(logits, axis=1) == labels[::-1]))
  # The same images and labels as webdataset shards (.cls), in the datasets list form.
  for shard in range(2):
    with tarfile.open(root / f'test-{shard}.tar', 'w') as tar:
      for i in range(shard, len(labels), 2):
        _add(tar, f'{i:04d}.png', (root / 'images' / f'img{i}.png').read_bytes())
        _add(tar, f'{i:04d}.cls', str(labels[i]).encode())
  ev = zeroshot.ZeroShotEvaluator(
      predict.Predictor(model, mesh), pp_img=PP_IMG, prompts=templates, tokenizer='bytes',
      text_len=TEXT_LEN, batch_size=16, datasets=[dict(
          dataset=f'wds:{root}/test-*.tar', name='digits_wds',
          classnames=str(root / 'classes.txt'))])
  assert ev.run({})['zeroshot/digits_wds/top1'] == pytest.approx(top1, abs=1e-9)


def test_zeroshot_label_past_the_classnames_is_an_error(mesh, held_out, tmp_path):
  root, _, _ = held_out
  (tmp_path / 'two.txt').write_text('zero\none\n')
  ev = zeroshot.ZeroShotEvaluator(
      predict.Predictor(StubModel(), mesh), dataset=f'csv:{root}/test.csv', pp_img=PP_IMG,
      classnames=str(tmp_path / 'two.txt'), tokenizer='bytes', text_len=TEXT_LEN)
  with pytest.raises(ValueError, match=r'zeroshot/test: label 3 is past its 2 class names'):
    ev.run({})


class MeanColourModel:
  """Image tower: the mean of each channel (the held-out classes are separable in it)."""

  def apply(self, variables, images, tokens, *, train):
    del variables, train
    return (None if images is None else jnp.concatenate(
        [images.mean(axis=(1, 2)), jnp.ones((len(images), 1))], axis=1)), (
        None if tokens is None else jnp.ones((len(tokens), 4)))


def test_probe_and_retrieval_read_file_sources(mesh, held_out):
  root, _, labels = held_out
  pred = predict.Predictor(MeanColourModel(), mesh)
  name = f'csv:{root}/test.csv'
  # Classes 0 and 3 share a bright channel: 3 separable groups of 4 classes.
  ev = probe.ProbeEvaluator(pred, dataset=name, test_split=name, pp_img=PP_IMG, shots=(2,),
                            seeds=2, val_per_class=2, classnames=str(root / 'classes.txt'),
                            normalize=False)
  got = ev.run({})
  assert ev.num_classes == 4
  assert set(got) == {'probe/test/2shot/top1', 'probe/test/2shot/top1_std'}
  best = 1 - min(np.mean(labels == 0), np.mean(labels == 3))  # 0 and 3 are one colour.
  assert got['probe/test/2shot/top1'] <= best + 1e-9
  assert got['probe/test/2shot/top1'] > 1.5 / len(CLASSES)
  with pytest.raises(ValueError, match=r"a file has no splits.*give test_split a file"):
    probe.ProbeEvaluator(pred, dataset=name, pp_img=PP_IMG)
  ev = retrieval.RetrievalEvaluator(pred, dataset=name, pp_img=PP_IMG, tokenizer='bytes',
                                    text_len=TEXT_LEN, csv=dict(separator='sniff'))
  got = ev.run({})
  # Every caption embeds alike: an image's captions tie (in the query's favour: rank 1);
  # a caption ranks the 40 images by their sum, its own once at each rank 1..40.
  assert got['retrieval/test/i2t_r1'] == 1.0
  assert got['retrieval/test/t2i_mean_rank'] == pytest.approx(41 / 2)


# ---------------------------------------------------------------- the run


def test_trains_on_a_tab_separated_csv_and_prints_zeroshot_top1(tmp_path, held_out, capsys):
  """Done when: trains on open_clip's .csv as written, and the same run's final table holds
  the zero-shot top-1 on a labelled CSV of held-out images."""
  root, _, _ = held_out
  labels = np.arange(16) % len(CLASSES)
  _write_images(tmp_path, 16, labels, prefix='train')
  (tmp_path / 'train.csv').write_text('filepath\ttitle\n' + ''.join(
      f'images/train{i}.png\ta scan of the digit {CLASSES[l]}\n' for i, l in enumerate(labels)))
  c = demo.get_config('tiny')
  c.progress_bar, c.total_steps, c.log_every, c.batch_size = False, 2, 1, 8
  c.image_size, c.input.shuffle_buffer = 16, 8
  c.input.name = f'csv:{tmp_path}/train.csv'
  c.evals = {'digits': dict(type='zeroshot', every=0, dataset=f'csv:{root}/test.csv',
                            classnames=str(root / 'classes.txt'), pp_img=PP_IMG,
                            prompts=['a scan of the digit {}'], batch_size=16)}
  final = loop.run(c, str(tmp_path / 'run'))
  table = capsys.readouterr().out.split('Final metrics')[-1]
  assert 0 <= final['zeroshot/test/top1'] <= 1
  assert 'zeroshot/test/top1' in table and f'{final["zeroshot/test/top1"]:.4f}' in table
