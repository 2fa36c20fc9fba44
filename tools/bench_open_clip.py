"""The torch reference of tools/bench_step.py: open_clip's CLIP of configs/bench_small.py.

  python tools/bench_step.py --config configs/bench_small.py --reference open_clip

Times an AdamW step of open_clip's model on a batch of the same shapes in the same process,
when torch and open_clip are installed (optional: BENCHMARKS.md section 1); with
`import_torch_first` called before TensorFlow loads.
"""
import statistics
import time


def median_seconds(fn, steps: int, warmup: int) -> float:
  """Median wall time of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def import_torch_first():
  """Imports open_clip before TensorFlow loads: torchvision's ops segfault when imported after it."""
  try:
    import open_clip  # noqa: F401  (torch 2.14.1 / torchvision 0.29.1 beside TF 2.21)
  except ImportError:
    pass


def open_clip_step(batch: int, steps: int, warmup: int, seed: int = 0) -> dict | None:
  """Seconds per AdamW train step of open_clip's bench_small CLIP, or None without torch."""
  try:
    import open_clip  # Optional: see BENCHMARKS.md.
    import torch
  except ImportError:
    return None
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(
      embed_dim=256, vision_cfg=dict(image_size=64, layers=6, width=256, head_width=64,
                                     patch_size=8),
      text_cfg=dict(context_length=32, vocab_size=4096, width=256, heads=4, layers=4),
      output_dict=True)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                          weight_decay=0.1)
  image = torch.rand(batch, 3, 64, 64) * 2 - 1
  text = torch.randint(1, 4096, (batch, 32))
  labels = torch.arange(batch)

  def one_step():  # open_clip's ClipLoss on one device, its train loop's clip and clamp.
    opt.zero_grad(set_to_none=True)
    out = model(image, text)
    zimg, ztxt, scale = out['image_features'], out['text_features'], out['logit_scale']
    logits = scale * zimg @ ztxt.T
    loss = (torch.nn.functional.cross_entropy(logits, labels) +
            torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, 4.6052)

  sec = median_seconds(one_step, steps, warmup)
  return {'reference': 'open_clip', 'reference_examples_per_sec': round(batch / sec, 2),
          'reference_params': sum(p.numel() for p in model.parameters()),
          'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}
