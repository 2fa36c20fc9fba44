"""One run per workdir: `workdir/lock`, written by process 0 of the run that holds it.

Two runs in one workdir would interleave their metrics and race each other's checkpoint
saves and deletions, so a second launch is refused, naming the holder's host and pid. The
lock records them with a heartbeat that a daemon thread refreshes every `heartbeat_s`. A
killed run cannot remove its lock, so a lock is taken over (with a message) when its holder
is dead: on this host when its pid is gone, on another host (a preempted VM) when its
heartbeat is older than `stale_s` (also for another container on this host, which may not
see the holder's pid).
"""
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import jax
import numpy as np

from mmcl import fs

FILENAME = 'lock'


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for one run (every process enters)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_s: float = 300.0):
    self.path = fs.join(workdir, FILENAME)
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self._record = dict(host=socket.gethostname(), pidns=_pid_namespace(), pid=os.getpid(),
                        token=uuid.uuid4().hex, started=time.time())
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except Exception as e:  # pylint: disable=broad-except  (all processes must hear)
        error = e
    if jax.process_count() > 1:  # Every process stops if process 0 was refused.
      from jax.experimental import multihost_utils
      refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if refused and error is None:
        raise WorkdirInUse(f'Process 0 was refused {self.path}: see its log.')
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc):
    self.release()
    return False

  def _acquire(self):
    holder = self._read()
    if holder is not None:
      reason = self._why_stale(holder)
      if reason is None:
        raise WorkdirInUse(
            f'The workdir is in use by pid {holder.get("pid")} on host '
            f'{holder.get("host")!r} (started {_ago(holder.get("started"))}, last '
            f'heartbeat {_ago(holder.get("heartbeat"))}; lock file {self.path}). Stop that '
            f'run or choose another workdir. A lock from a dead run is taken over by itself '
            f'({self.stale_s:.0f} s after its last heartbeat).')
      message = (f'Taking over the lock {self.path} of pid {holder.get("pid")} on host '
                 f'{holder.get("host")!r}: {reason}.')
      logging.warning(message)
      print(message, flush=True)
    self._write(exclusive=holder is None)
    if (self._read() or {}).get('token') != self._record['token']:
      raise WorkdirInUse(f'Another run took the lock {self.path} at the same moment: '
                         f'{self._read()}.')
    self._thread = threading.Thread(target=self._beat, daemon=True, name='workdir-lock')
    self._thread.start()

  def _why_stale(self, holder: dict) -> str | None:
    """Why the holder is dead, or None if it may be alive."""
    age = time.time() - float(holder.get('heartbeat') or 0)
    same_host = all(holder.get(k) == self._record[k] for k in ('host', 'pidns'))
    if same_host and isinstance(holder.get('pid'), int):  # Its pid is meaningful here.
      if not _pid_alive(holder['pid']):
        return 'that process is gone'
      if holder['pid'] == os.getpid():
        return 'it is this process (a run in it that did not finish)'
    if age > self.stale_s:
      return f'its last heartbeat was {age:.0f} s ago (> {self.stale_s:.0f} s)'
    return None

  def _read(self) -> dict | None:
    try:
      record = json.loads(fs.read_text(self.path))
    except FileNotFoundError:
      return None
    except (ValueError, OSError) as e:  # Torn or unreadable: its writer is long gone.
      logging.warning('Unreadable lock file %s (%s): treated as stale.', self.path, e)
      return {}
    return record if isinstance(record, dict) else {}

  def _write(self, exclusive: bool = False):
    text = json.dumps({**self._record, 'heartbeat': time.time()})
    if exclusive and not fs.is_remote(self.path):  # Atomic create: two launches, one wins.
      fs.makedirs(os.path.dirname(self.path))
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        raise WorkdirInUse(f'Another run took the lock {self.path} at the same moment: '
                           f'{self._read()}.') from None
      with os.fdopen(fd, 'w') as f:
        f.write(text)
    else:
      fs.write_text_atomic(self.path, text)

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read()
        if (holder or {}).get('token') != self._record['token']:
          logging.error('The lock %s was taken over by %s: two runs may now share the '
                        'workdir.', self.path, holder)
          return
        self._write()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not refresh the lock %s: %s', self.path, e)

  def release(self):
    """Removes the lock if this run holds it (process 0); safe to call twice."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    try:
      if (self._read() or {}).get('token') == self._record['token']:
        fs.path(self.path).unlink()
    except OSError as e:
      logging.warning('Could not remove the lock %s: %s', self.path, e)


def _pid_namespace() -> int | None:
  """Which pids this process sees: containers sharing a host name may not see each other's."""
  try:
    return os.stat('/proc/self/ns/pid').st_ino
  except OSError:
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def _ago(t) -> str:
  if not t:
    return 'at an unknown time'
  return f'{time.time() - float(t):.0f} s ago'
