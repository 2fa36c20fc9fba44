"""Input faults: a stream that keeps nothing stops (naming why, and on SIGTERM), a bad shard,
row or file is skipped and named, and the data state is small, exact and checked."""
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

from configs import demo
from mmcl.data import data_state, drops, input_pipeline, skipped
from mmcl.data.shapes import builder as shapes_builder
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
  c = demo.get_config('tiny')
  c.data_dir, c.progress_bar = data_dir, False
  c.update_from_flattened_dict(overrides)
  return c


def _png(i, size=64):
  rng = np.random.default_rng(i)
  return shapes_builder.encode_png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_shard(path, ids):
  with tarfile.open(path, 'w') as tar:
    for i in ids:
      _add(tar, f'{i:06d}.png', _png(i))
      _add(tar, f'{i:06d}.txt', f'picture {i}'.encode())


def _captions(name):
  ds = input_pipeline.get_dataset(name=name, split='train', pp='keep("captions")',
                                  batch_size=1000, train=False)
  return sorted(c[0].decode() for b in ds.as_numpy_iterator() for c in b['captions'])


@pytest.fixture
def skips(monkeypatch):
  """A fresh count of what the sources skip, for this test alone."""
  log = skipped.SkipLog()
  monkeypatch.setattr(skipped, 'SKIPPED', log)
  return log


def _mesh():
  return mesh_lib.create_mesh([('data', -1)])


# --------------------------------------------------------------- a stream keeping nothing


def test_a_stream_that_keeps_nothing_stops_naming_the_reason(shapes_data_dir):
  """64 px data with image_size=32: every record has the wrong shape (hung forever)."""
  c = tiny_config(shapes_data_dir, image_size=32)
  c.input.max_dropped_in_a_row = 500
  batches = loop.make_batches(c, _mesh(), c.seed)
  with pytest.raises(drops.InputStalled, match=r'kept no record in 500 in a row '
                     r'\(config.input.max_dropped_in_a_row\).*500 with the wrong shape.*'
                     r'image \(32, 32, 3\) \(config.image_size=32\)'):
    next(batches)


def test_every_image_path_wrong_stops_naming_the_files(shapes_data_dir, tmp_path, skips):
  """A CSV whose image paths all miss (was a bare StopIteration)."""
  lines = ['filepath\ttitle'] + [f'nowhere/{i}.png\tpicture {i}' for i in range(8)]
  (tmp_path / 'train.tsv').write_text('\n'.join(lines) + '\n')
  c = tiny_config(shapes_data_dir, batch_size=8)
  c.input.name, c.input.shuffle_buffer, c.input.max_dropped_in_a_row = (
      f'csv:{tmp_path}/train.tsv', 4, 100)
  batches = loop.make_batches(c, _mesh(), c.seed)
  with pytest.raises(drops.InputStalled, match=r'kept no record in 100 in a row.*0 with the '
                     r'wrong shape, 100 that failed to read.*unreadable: .*train.tsv line \d+: '
                     r'.*nowhere/\d.png'):
    next(batches)
  assert skips.counts()['unreadable'] >= 100


def _catches_sigterm(pid: int) -> bool:
  """Whether the process has a SIGTERM handler installed (Linux: /proc/PID/status)."""
  with open(f'/proc/{pid}/status') as f:
    caught = next(int(l.split()[1], 16) for l in f if l.startswith('SigCgt:'))
  return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_sigterm_while_waiting_for_input_exits_cleanly(shapes_data_dir, tmp_path):
  """SIGTERM while the loop waits on a stream that keeps nothing (it was ignored: only
  SIGKILL stopped the run). No limit to end the wait: only the signal can."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'train.py'),
         f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny',
         f'--workdir={tmp_path}', f'--config.data_dir={shapes_data_dir}',
         '--config.image_size=32', '--config.input.max_dropped_in_a_row=0',
         '--config.progress_bar=False']
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not _catches_sigterm(proc.pid):
    time.sleep(0.1)  # The loop installs its handler just before it asks for batch 1.
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  time.sleep(2)  # Now inside next(batches), which never returns by itself.
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-3000:]
  assert 'Preempted while waiting for input for step 1: no checkpoint written' in out


# --------------------------------------------------------------- bad shards, rows, files


def test_truncated_and_unreadable_shards_are_skipped_and_named(tmp_path, skips):
  """A truncated tar (was tarfile.ReadError at indexing, no shard named), a file that is
  not a tar and one that cannot be read: their good samples are kept, each is named."""
  _write_shard(tmp_path / 'a.tar', range(0, 6))
  _write_shard(tmp_path / 'b.tar', range(6, 12))
  data = (tmp_path / 'b.tar').read_bytes()
  (tmp_path / 'b.tar').write_bytes(data[:len(data) // 2])  # Cut inside a member.
  (tmp_path / 'c.tar').write_bytes(b'not a tar file at all' * 100)
  os.makedirs(tmp_path / 'd.tar')  # Matches the pattern; reading it fails.
  ids = sorted(int(c.split()[1]) for c in _captions(f'wds:{tmp_path}/*.tar'))
  assert ids[:6] == list(range(6))  # a.tar whole,
  assert 1 <= len(ids[6:]) < 6 and ids[6:] == list(range(6, 6 + len(ids[6:])))  # b.tar's
  # members before the cut.
  assert skips.counts()['bad_shard'] == 3


def test_shard_damage_is_logged_with_file_and_member(tmp_path, monkeypatch, skips):
  del skips  # Fresh counts: the first skips of a reason are logged one by one.
  logged = []
  monkeypatch.setattr(skipped.logging, 'warning', lambda fmt, *a: logged.append(fmt % a))
  _write_shard(tmp_path / 'a.tar', range(4))
  data = (tmp_path / 'a.tar').read_bytes()
  (tmp_path / 'a.tar').write_bytes(data[:len(data) // 2])
  _captions(f'wds:{tmp_path}/a.tar')
  assert any('bad_shard' in m and f'{tmp_path}/a.tar after member' in m and 'truncated' in m
             for m in logged), logged


def test_a_non_utf8_byte_skips_its_row_only(tmp_path, skips):
  """One bad byte in a TSV (was UnicodeDecodeError ... position 309, no file or row)."""
  os.makedirs(tmp_path / 'images')
  rows = [b'filepath\ttitle']
  for i in range(6):
    (tmp_path / 'images' / f'{i}.png').write_bytes(_png(i))
    caption = b'caf\xe9 au lait' if i == 3 else f'picture {i}'.encode()  # Latin-1 byte.
    rows.append(f'images/{i}.png\t'.encode() + caption)
  (tmp_path / 'train.tsv').write_bytes(b'\n'.join(rows) + b'\n')
  assert _captions(f'csv:{tmp_path}/train.tsv') == [f'picture {i}' for i in (0, 1, 2, 4, 5)]
  assert skips.counts() == {'not_utf8': 1}
  assert f'{tmp_path}/train.tsv line 5: byte 0xe9' in skips.describe()


def test_a_file_unreadable_at_training_time_is_dropped_and_named(tmp_path, skips):
  _write_shard(tmp_path / 'a.tar', range(5))
  name = f'wds:{tmp_path}/a.tar'
  rows, read = input_pipeline.sources.file_source(name, 0, 1)
  os.remove(tmp_path / 'a.tar')  # Indexed, then gone (a moved file, a remote hiccup).
  samples = list(rows.map(read).as_numpy_iterator())
  assert [s['image'] for s in samples] == [b''] * 5  # Dropped by `decode`, never fatal.
  assert skips.counts() == {'unreadable': 5}


# ---------------------------------------------------------------------- the data state


def _tiny_batches(data_dir, seed=0, **kwargs):
  c = tiny_config(data_dir, batch_size=16, **kwargs)
  return loop.make_batches(c, _mesh(), seed)


# 8 px images: the decoded examples read ahead weigh little beside the encoded records.
_SMALL_DECODED = {'image_size': 8, 'input.pp': demo.get_config('tiny').input.pp.replace(
    'decode|', 'decode|resize({image_size})|')}


def _state_bytes(directory) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
             for f in fs)


def test_data_state_does_not_grow_with_the_records_read(shapes_data_dir, tmp_path):
  """TFDS's auto-cache of a small split lived in the iterator: every data state held the
  records read so far, up to the whole split (196 MB for configs/limoe_demo.py)."""
  batches = _tiny_batches(shapes_data_dir, **_SMALL_DECODED, **{'input.shuffle_buffer': 16})
  sizes = []
  for n in (2, 30):
    while batches._emitted[0] < n * 16:  # pylint: disable=protected-access
      next(batches)
    batches.save(str(tmp_path / str(n)))
    sizes.append(_state_bytes(tmp_path / str(n)))
  assert sizes[1] < 1.2 * sizes[0], sizes  # 28 more batches read: about the same size.


def test_file_sources_shuffle_rows_not_image_bytes(tmp_path, shapes_data_dir):
  _write_shard(tmp_path / 'a.tar', range(64))
  image_bytes = len(_png(0))
  c = tiny_config(shapes_data_dir, batch_size=8, **_SMALL_DECODED)
  c.input.name, c.input.shuffle_buffer = f'wds:{tmp_path}/a.tar', 48
  batches = loop.make_batches(c, _mesh(), 0)
  next(batches)
  batches.save(str(tmp_path / 'state'))
  # 48 buffered samples of ~12 KB each would be ~600 KB; rows are file offsets.
  assert _state_bytes(tmp_path / 'state') < 48 * image_bytes / 4


def test_data_state_snapshot_resumes_exactly_while_it_is_written(shapes_data_dir, tmp_path):
  batches = _tiny_batches(shapes_data_dir)
  for _ in range(2):
    next(batches)
  batches.save_async(str(tmp_path))  # Snapshot now; the stream moves on meanwhile.
  want = [next(batches) for _ in range(3)]
  batches.wait()
  resumed = _tiny_batches(shapes_data_dir)
  resumed.restore(str(tmp_path))
  for w, g in zip(want, [next(resumed) for _ in range(3)]):
    for k in w:
      np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=k)


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'empty'])
def test_damaged_data_state_is_refused_naming_file_and_cause(shapes_data_dir, tmp_path,
                                                             damage):
  """A truncated data state gave `IndexError: Read less bytes than requested`."""
  batches = _tiny_batches(shapes_data_dir)
  next(batches)
  batches.save(str(tmp_path))
  path = data_state.shard_path(str(tmp_path), 0)
  data = open(path, 'rb').read()
  data = {'truncate': data[:len(data) // 2],
          'flip': data[:-100] + bytes(b ^ 0xFF for b in data[-100:]),
          'empty': b''}[damage]
  open(path, 'wb').write(data)
  cause = {'truncate': 'is truncated', 'flip': 'is damaged', 'empty': 'cannot be read'}[damage]
  with pytest.raises(data_state.DataStateError, match=f'{path} {cause}'):
    _tiny_batches(shapes_data_dir).restore(str(tmp_path))


def test_a_damaged_data_state_falls_back_to_a_reseeded_stream(shapes_data_dir, tmp_path,
                                                              capsys):
  """Like a missing data state: the run resumes, reseeded, naming the step and the cause."""
  c = tiny_config(shapes_data_dir, total_steps=2, ckpt_every=2)
  c.evals = {}
  loop.run(c, str(tmp_path))
  path = data_state.shard_path(str(tmp_path / 'data_state' / '2'), 0)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 3])
  c.total_steps = 4
  loop.run(c, str(tmp_path))
  out = capsys.readouterr().out
  assert (f'The data state of step 2 is unusable, so the input stream is reseeded: {path} '
          'is truncated') in out
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['2', '4']


# ------------------------------------------------------------- smaller config and file errors


def test_batch_size_and_lr_are_checked_before_compiling(shapes_data_dir):
  from mmcl.train import validate  # pylint: disable=g-import-not-at-top
  for bad, match in ((dict(batch_size=0), r'config.batch_size=0 must be positive'),
                     (dict(batch_size=-8), r'config.batch_size=-8 must be positive'),
                     (dict(lr=-1e-3), r'config.lr=-0.001 must be a finite number >= 0'),
                     (dict(lr=float('nan')), r'config.lr=nan must be a finite number')):
    with pytest.raises(ValueError, match=match):
      validate.validate(tiny_config(shapes_data_dir, **bad))


@pytest.mark.parametrize('name', ['cvs:/data/train.tsv', 'wsd:/shards/*.tar',
                                  'gs://bucket/train.tsv'])
def test_a_source_scheme_typo_names_the_valid_schemes(shapes_data_dir, name):
  """Was TFDS's 'Parsing builder name string cvs:/x.tsv failed', never naming csv:/wds:."""
  from mmcl.train import validate  # pylint: disable=g-import-not-at-top
  c = tiny_config(shapes_data_dir)
  c.input.name = name
  scheme = name.split(':')[0]
  with pytest.raises(ValueError, match=rf"Unknown data source '{re.escape(name)}': "
                     rf"'{scheme}:' is not a source scheme. Valid: 'csv:.*'wds:.*TFDS name"):
    validate.validate(c)
  for ok in ('mmcl_shapes/tiny:1.0.0', 'mmcl_shapes:1.*', 'csv:/x.tsv'):
    input_pipeline.sources.check_name(ok)


@pytest.mark.parametrize('content', ['random', 'pickled', 'empty'])
def test_an_npz_that_is_not_a_weight_file_says_so_without_pickle_advice(tmp_path, content):
  """numpy's message suggested allow_pickle=True: an unsafe fix."""
  from mmcl.convert import io as convert_io  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'w.npz')
  if content == 'random':
    (tmp_path / 'w.npz').write_bytes(np.random.default_rng(0).bytes(4096))
  elif content == 'pickled':
    np.savez(path, x=np.array([{'a': 1}], dtype=object))
  else:
    (tmp_path / 'w.npz').write_bytes(b'')
  for load in (convert_io.load_params, convert_io.load_state_dict):
    with pytest.raises(ValueError, match='is not an mmcl weight file') as e:
      load(path)
    assert 'pickle' not in str(e.value).replace('never unpickled', '')


def test_documented_demo_export_works(tmp_path):
  """docs/pretrained.md's export of the demo checkpoint (was always refused: pool='gap')."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mmcl import models  # pylint: disable=g-import-not-at-top
  doc = open(os.path.join(ROOT, 'docs', 'pretrained.md')).read()
  train, export = [next(
      m.group(0).replace('\\\n', ' ') for m in re.finditer(
          rf'python tools/{tool}\.py (?:[^\n]*\\\n)*[^\n]*', doc[doc.index('## Export'):])
      if 'configs/demo.py' in m.group(0)) for tool in ('train', 'convert')]
  overrides = re.findall(r'--config\.\S+', train)
  assert overrides == re.findall(r'--config\.\S+', export) == ['--config.model.image.pool=tok']
  c = demo.get_config('')
  c.model.image.pool = 'tok'  # As the documented training command sets it.
  model = models.get_model(c.model)
  params = model.init({'params': jax.random.key(0)}, np.zeros((1, 64, 64, 3), np.float32),
                      np.zeros((1, c.text_len), np.int32))['params']
  workdir = tmp_path / 'WORKDIR'
  checkpointer = ocp.StandardCheckpointer()  # What training writes under ckpt/<step>.
  checkpointer.save(workdir / 'ckpt' / '2000' / 'default', {'params': params})
  checkpointer.wait_until_finished()
  args = export.replace('WORKDIR', str(workdir)).replace('/tmp/demo_oc', str(tmp_path / 'oc'))
  args = args.replace('configs/', os.path.join(ROOT, 'configs') + '/').split()[2:]
  done = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'convert.py'), *args],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.path.getsize(tmp_path / 'oc.safetensors') > 1000
  assert '"pool_type": "tok"' in (tmp_path / 'oc.json').read_text()
