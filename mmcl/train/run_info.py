"""`<workdir>/run_info.json`: what a run was (config, package versions, devices), for reports.

Process 0 writes it at each start; a resumed run appends its start (step, time, versions,
devices) to `starts` and replaces `config` with the one it runs now.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess

import jax

from mmcl import fs

FILENAME = 'run_info.json'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-cpu',
            'tensorflow-datasets', 'numpy', 'wandb')


def versions() -> dict:
  """Python, the installed versions of PACKAGES (those present) and mmcl's git commit."""
  out = {'python': platform.python_version()}
  for p in PACKAGES:
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:  # A checkout: the commit it runs (absent for an installed wheel).
    out['mmcl_commit'] = subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, timeout=10,
        cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return out


def read(workdir: str) -> dict:
  """The run's info ({} when the run predates this file)."""
  path = fs.join(workdir, FILENAME)
  return json.loads(fs.read_text(path)) if fs.exists(path) else {}


def write(config, workdir: str, start_step: int) -> dict:
  """Records this start of the run (process 0 only); returns the info."""
  if jax.process_index() != 0:
    return {}
  info = read(workdir)
  d = jax.devices()[0]
  info['config'] = json.loads(config.to_json_best_effort())
  info.setdefault('starts', []).append(dict(
      step=start_step, time=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'), host=platform.node(), versions=versions(),
      devices=dict(platform=d.platform, kind=d.device_kind, count=jax.device_count(),
                   processes=jax.process_count())))
  fs.write_text_atomic(fs.join(workdir, FILENAME), json.dumps(info, indent=1) + '\n')
  return info
