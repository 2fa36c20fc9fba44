"""The one filesystem layer for every path a run reads or writes (etils.epath).

A workdir may be local or remote (`gs://bucket/run` on a pod): checkpoints, the data state,
metrics, TensorBoard, eval output, model_init files and converted weights all go through
here, never through `open()` or `os.path` on a possibly-remote path. epath is what orbax
itself uses (tf.io.gfile for gs:// when TensorFlow is installed, else fsspec).
"""
import os
import shutil

from etils import epath

# The URI schemes epath handles; a local path has none.
REMOTE_SCHEMES = ('gs', 's3', 'az', 'hf')


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def path(p) -> epath.Path:
  """`p` as an epath.Path; a local path is made absolute (orbax needs that)."""
  p = os.fspath(p)
  if is_remote(p):
    return epath.Path(p)
  return epath.Path(os.path.abspath(os.path.expanduser(p)))


def join(p, *parts: str) -> str:
  """`p/part/...` as a string; `gs://b/x` stays `gs://b/x/...` (os.path.join would do too,
  but this also makes a local path absolute)."""
  return os.fspath(path(p).joinpath(*parts))


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def listdir(p) -> list[str]:
  """The names in directory `p`, or [] if there is none."""
  d = path(p)
  return sorted(c.name for c in d.iterdir()) if d.is_dir() else []


def makedirs(p):
  path(p).mkdir(parents=True, exist_ok=True)


def rmtree(p):
  d = path(p)
  if d.exists():
    d.rmtree()


def rename(src, dst):
  """Moves `src` to `dst` (parents created): a file replaces `dst` (atomically where the
  filesystem can: the temporary-then-rename write); a directory must not exist at `dst`.
  On GCS a directory move is a copy and a delete of each object."""
  src, dst = path(src), path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  if not src.is_dir():
    src.replace(dst)
  elif is_remote(src):
    if dst.exists():
      raise FileExistsError(f'Cannot move {src}: {dst} exists.')
    _copytree(src, dst)
    src.rmtree()
  else:
    src.rename(dst)


def open(p, mode: str = 'r'):  # pylint: disable=redefined-builtin
  if any(m in mode for m in 'wa'):
    path(p).parent.mkdir(parents=True, exist_ok=True)
  return path(p).open(mode)


def read_text(p) -> str:
  return path(p).read_text()


def write_text_atomic(p, text: str):
  """Writes `p` so that a crash leaves the old or the new file, never half of one: locally
  by a rename, remotely because one object write is atomic."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_text(text)
    return
  tmp = p.with_name(p.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, p)


def _copytree(src: epath.Path, dst: epath.Path):
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      _copytree(child, dst / child.name)
    else:
      with child.open('rb') as r, (dst / child.name).open('wb') as w:
        shutil.copyfileobj(r, w)
