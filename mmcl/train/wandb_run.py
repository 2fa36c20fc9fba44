"""`config.wandb`: the training log's rows also to Weights & Biases (optional, off by default).

`pip install 'mmcl[wandb]'`. Process 0 starts (or resumes) the run; its id is kept in
`<workdir>/wandb_run_id`, so a resumed training continues the same W&B run. `mode` is W&B's
('online', 'offline', 'disabled'; None: $WANDB_MODE, else online). An offline run writes
`<workdir>/wandb/offline-run-*` (one directory per start, all with the same run id:
`wandb sync <workdir>/wandb/offline-run-*` uploads them as one run). Files go to the local
workdir only: W&B cannot write to gs://.
"""
import secrets

import jax

from mmcl import fs

ID_FILE = 'wandb_run_id'


def start(config, workdir: str):
  """The W&B run to log to, or None (off, or not process 0)."""
  c = config.get('wandb') or {}
  if not c.get('enabled') or jax.process_index() != 0:
    return None
  try:
    import wandb
  except ImportError:
    raise ImportError("config.wandb.enabled=True needs wandb: pip install 'mmcl[wandb]' "
                      '(or pip install wandb).') from None
  if fs.is_remote(workdir):
    raise ValueError(f'config.wandb needs a local workdir (W&B writes its files there), '
                     f'not {workdir}.')
  path = fs.join(workdir, ID_FILE)
  if fs.exists(path):
    run_id = fs.read_text(path).strip()
  else:
    run_id = secrets.token_hex(4)  # W&B ids: short lowercase alphanumerics.
    fs.makedirs(workdir)
    fs.write_text_atomic(path, run_id + '\n')
  return wandb.init(project=c.get('project') or 'mmcl', entity=c.get('entity'),
                    name=c.get('name'), id=run_id, resume='allow', dir=workdir,
                    mode=c.get('mode'), config=config.to_dict())
