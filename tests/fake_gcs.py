"""A fake `gs://` for tests: every gs:// path lives under a local root, no network.

Three layers of the stack see gs:// paths and each is pointed at the root:
- etils.epath (mmcl.fs, orbax's files and directories): its tf.io.gfile backend is replaced
  by one that maps `gs://bucket/x` to `root/bucket/x`;
- tensorstore (orbax's array data): orbax's GCS kvstore spec becomes a `file` kvstore
  under the root (tensorstore's GCS driver speaks HTTP to Google; it cannot be faked here);
- orbax's bucket lookup (hierarchical-namespace check, google-cloud-storage): a bucket
  without one.
Nothing else may reach the path: TensorFlow's own GCS client, or `open()`, would fail or
write under the current directory, which the tests check stays empty.
"""
import os

from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

PREFIX = 'gs://'


class _Backend(epath_backend.Backend):
  """epath's os backend on `root`, for gs:// paths."""

  def __init__(self, root: str):
    self.root = root
    self.os = epath_backend.os_backend

  def local(self, p) -> str:
    p = os.fspath(p)
    assert p.startswith(PREFIX), p
    return os.path.join(self.root, p[len(PREFIX):])

  def remote(self, p) -> str:
    return PREFIX + os.path.relpath(os.fspath(p), self.root)

  def open(self, path, mode):
    return self.os.open(self.local(path), mode)

  def exists(self, path):
    return self.os.exists(self.local(path))

  def isdir(self, path):
    return self.os.isdir(self.local(path))

  def listdir(self, path):
    return self.os.listdir(self.local(path))

  def glob(self, path):
    return [self.remote(p) for p in self.os.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for d, dirs, files in os.walk(self.local(top), topdown=top_down, onerror=on_error):
      yield self.remote(d), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return self.os.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return self.os.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return self.os.rmtree(self.local(path))

  def remove(self, path):
    return self.os.remove(self.local(path))

  def rename(self, path, dst):
    return self.os.rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return self.os.replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    return self.os.copy(self.local(path), self.local(dst), overwrite)

  def stat(self, path):
    return self.os.stat(self.local(path))


class _Bucket:
  hierarchical_namespace_enabled = False


def install(monkeypatch, root: str):
  """Points gs:// at `root` for the rest of the test."""
  backend = _Backend(root)
  monkeypatch.setattr(epath_backend, 'tf_backend', backend)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'gs', backend)  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, '_is_zonal_gcs_bucket', lambda bucket: False)

  def kvstore(ckpt_path: str) -> dict:
    return {'driver': 'file', 'path': backend.local(ckpt_path)}

  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', kvstore)
  monkeypatch.setattr(gcs_utils, 'get_bucket', lambda name: _Bucket())
  return backend
