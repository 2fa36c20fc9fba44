"""One Markdown page about a run, with PNG plots: what a person looks at instead of numbers.

`write(workdir)` reads `metrics.jsonl` and `run_info.json` and writes `<out>/report.md`
with, each drawn only when the run logged it:
  training.png   loss, learning rate, temperature, examples/s, MFU, where the time went,
                 device memory, dropped input records (mmcl.train.logger's metrics)
  evals.png      evaluation metrics across steps (zero-shot top-1, retrieval recall@1,
                 probe top-1, modality gap)
  experts.png    a MoE run's expert utilisation per layer and modality, last step
and tables of the last values, the run's starts (step, time, host, devices, versions) and
its config. tools/report.py is the command.
"""
import json
import os

from mmcl import fs
from mmcl.models import moe
from mmcl.train import metrics as metrics_lib
from mmcl.train import plots, run_info

TRAINING_PANELS = ('train/loss', 'train/lr', 'train/t', 'train/examples_per_sec',
                   'train/mfu', 'train/time/*_fraction', 'memory/*bytes_in_use',
                   'data/dropped_records')
EVAL_PANELS = ('zeroshot/*/top1', 'retrieval/*_r1', 'probe/*/top1',
               'geometry/*/modality_gap')


def _points(rows, panels) -> int:
  return sum(len(steps) for p in panels for steps, _ in plots._series(rows, p).values())


def write(workdir: str, out_dir: str | None = None) -> dict:
  """Writes the page and its plots; returns {'page': path, 'plots': {file: points drawn}}."""
  out_dir = out_dir or os.path.join(workdir, 'report')
  rows = metrics_lib.read_metrics(workdir)
  if not rows:
    raise ValueError(f'No metrics in {fs.join(workdir, metrics_lib.FILENAME)}: nothing to '
                     'report (has the run logged a step yet?).')
  os.makedirs(out_dir, exist_ok=True)
  drawn = {}
  for name, panels, columns in (('training.png', TRAINING_PANELS, 4),
                                ('evals.png', EVAL_PANELS, 4)):
    present = [p for p in panels if plots._series(rows, p)]
    if present:
      plots.plot_runs([workdir], os.path.join(out_dir, name), present, labels=[''],
                      columns=columns)
      drawn[name] = _points(rows, present)
  if any(moe.utilisation(r) for r in rows):
    plots.plot_utilisation(workdir, os.path.join(out_dir, 'experts.png'))
    drawn['experts.png'] = sum(
        len(v) for u in moe.utilisation([r for r in rows if moe.utilisation(r)][-1]).values()
        for v in u.values())
  page = os.path.join(out_dir, 'report.md')
  with open(page, 'w') as f:
    f.write(_page(workdir, rows, run_info.read(workdir), drawn))
  return {'page': page, 'plots': drawn}


def _page(workdir, rows, info, drawn) -> str:
  last = {}
  for r in rows:
    last.update(r)
  train_steps = [r['step'] for r in rows if 'train/loss' in r]
  lines = [f'# Run report: {workdir}', '',
           f'{len(train_steps)} logged train steps, the last {max(train_steps, default=0)}; '
           f'{len(rows)} rows in metrics.jsonl.', '']
  titles = {'training.png': 'Training', 'evals.png': 'Evaluations',
            'experts.png': 'Expert utilisation'}
  for name, title in titles.items():
    if name in drawn:
      lines += [f'## {title}', '', f'![{title}]({name})', '']
  lines += ['## Last values', '', '| metric | value | step |', '|---|---|---|']
  last_step = {k: r['step'] for r in rows for k in r}
  for k in sorted(last):
    if k != 'step' and not k.startswith(('train/moe/', 'data/shard')):
      lines.append(f'| {k} | {last[k]:.6g} | {last_step[k]} |')
  lines.append('')
  if info.get('starts'):
    lines += ['## Starts', '', '| step | time (UTC) | host | devices | versions |',
              '|---|---|---|---|---|']
    for s in info['starts']:
      d = s.get('devices', {})
      versions = ', '.join(f'{k} {v}' for k, v in s.get('versions', {}).items())
      lines.append(f"| {s['step']} | {s['time']} | {s.get('host', '')} | "
                   f"{d.get('count')} x {d.get('kind')} ({d.get('processes')} processes) | "
                   f'{versions} |')
    lines.append('')
  if info.get('config'):
    lines += ['## Config', '', '```json', json.dumps(info['config'], indent=1,
                                                     sort_keys=True), '```', '']
  return '\n'.join(lines)
