"""A captioned, boxed picture of the decoder's outputs on test images (docs/siglip2.md).

`outputs(evaluator, params, n)` runs a CaptioningEvaluator's generation on the first `n`
images of its split; `draw(...)` puts each image in a panel with its true box (solid) and
the box the decoder predicted for its region caption (aref, dashed), titled with the greedy
caption (cap) and the region caption generated for the true box (gcap).
"""
import numpy as np


def outputs(evaluator, params, n: int = 8) -> list[dict]:
  """Per image: image [H, W, 3] in [-1, 1], caption (first reference), region, box and each
  of the evaluator's tasks' decoded outputs (texts; a box for aref)."""
  rows = []
  for images, captions, regions, boxes in evaluator.batches():
    images, captions, regions, boxes = (x[:n - len(rows)] for x in
                                        (images, captions, regions, boxes))
    answers = evaluator.generate(params, images, regions, boxes)
    for i in range(len(images)):
      rows.append({'image': images[i], 'caption': captions[i][0], 'region': regions[i],
                   'box': boxes[i], **{t: evaluator.decode(t, a[i]) for t, a in answers.items()}})
    if len(rows) >= n:
      break
  return rows


def draw(rows: list[dict], out: str, columns: int = 4) -> str:
  """Writes the panels of `rows` (from `outputs`) to the PNG `out`; returns `out`."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.patches as patches
  import matplotlib.pyplot as plt
  lines = 1 + sum(t in rows[0] for t in ('cap', 'aref', 'gcap'))
  n_rows = -(-len(rows) // columns)
  fig, axes = plt.subplots(n_rows, columns, figsize=(3.2 * columns, (3.0 + 0.3 * lines) * n_rows),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, row in zip(axes.flat, rows):
    image = np.clip((np.asarray(row['image'], np.float32) + 1) / 2, 0, 1)
    h, w = image.shape[:2]
    ax.imshow(image, interpolation='nearest')
    _box(ax, patches, row['box'], h, w, 'lime', '-')
    if 'aref' in row:
      _box(ax, patches, row['aref'], h, w, 'red', '--')
    title = [f'true: {row["caption"]}']
    if 'cap' in row:
      title.append(f'cap: {row["cap"]}')
    if 'aref' in row:
      title.append(f'aref (red box) of: {row["region"]}')
    if 'gcap' in row:
      title.append(f'gcap of the green box: {row["gcap"]}')
    ax.set_title('\n'.join(_wrap(t) for t in title), fontsize=7, loc='left')
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def _box(ax, patches, box, h, w, color, style):
  y0, x0, y1, x1 = np.asarray(box, np.float64)
  ax.add_patch(patches.Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h,
                                 fill=False, edgecolor=color, linestyle=style, linewidth=1.5))


def _wrap(text: str, width: int = 44) -> str:
  words, lines = text.split(), ['']
  for word in words:
    if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
      lines.append('')
    lines[-1] = f'{lines[-1]} {word}'.strip()
  return '\n'.join(lines)
