r"""Where bench_small's step time goes, next to open_clip: fwd+bwd of each tower and of LayerNorm.

  python tools/bench_parts.py [--steps 5]
  python tools/bench_parts.py --layouts [--steps 9]

Times, alternating in one process (so both sides see the same load), the median of `--steps`
calls of: each mmcl tower (jitted fwd+bwd of the sum of squared embeddings, batch 128) and
open_clip's `encode_image` / `encode_text` of the same model (configs/bench_small.py), and
flax's LayerNorm VJP against torch's LayerNorm forward+backward at [128, 65, 256]. Prints one
JSON line of milliseconds. Needs torch and open_clip (optional; see BENCHMARKS.md).

`--layouts` (no torch needed) times instead the two layout choices of mmcl's blocks against
the plain flax ones, fwd+bwd of two pre-norm residual sub-blocks at bench_small's image
shapes [128, 65, 256]: the MLP on flattened tokens vs on [B, L, D], and attention with
`heads_first_attention` vs flax's default `dot_product_attention`.
"""
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def alternate(fns: dict, steps: int) -> dict:
  """Median milliseconds of each no-argument function, called in turn `steps` times."""
  for f in fns.values():
    f(), f()
  times = {k: [] for k in fns}
  for _ in range(steps):
    for k, f in fns.items():
      start = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - start)
  return {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}


def layouts(steps: int) -> dict:
  """Milliseconds of fwd+bwd of two pre-norm residual MLP (attention) sub-blocks, x + f(LN(x)),
  with mmcl's layout and with the plain-flax one."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from mmcl.models import transformer

  class MlpOnBxL(nn.Module):  # transformer.MlpBlock before it flattened the tokens.
    @nn.compact
    def __call__(self, x):
      return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(x)))

  class Residuals(nn.Module):  # As in the encoder, where the layouts' costs show.
    make: Callable[[], nn.Module]
    attention: bool = False

    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        y = nn.LayerNorm()(x)
        x = x + (self.make()(y, y) if self.attention else self.make()(y))
      return x

  attention = lambda **kw: lambda: nn.MultiHeadDotProductAttention(
      num_heads=4, force_fp32_for_softmax=True, **kw)
  parts = {
      'mlp_flat_tokens': Residuals(transformer.MlpBlock),
      'mlp_bxl_tokens': Residuals(MlpOnBxL),
      'attention_heads_first': Residuals(
          attention(attention_fn=transformer.heads_first_attention), attention=True),
      'attention_flax_default': Residuals(attention(), attention=True),
  }
  x = jax.random.normal(jax.random.key(1), (128, 65, 256))
  fns = {}
  for name, module in parts.items():
    params = module.init(jax.random.key(0), x)
    loss = lambda p, x, m=module: jnp.sum(m.apply(p, x)**2)
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    fns[name] = lambda step=step, params=params: jax.block_until_ready(step(params, x))
  return alternate(fns, steps)


def main(argv):
  del argv
  if flags.FLAGS.layouts:
    ms = layouts(flags.FLAGS.steps)
    print(json.dumps({'unit': 'ms', 'load_average': os.getloadavg()[0], **ms}), flush=True)
    return
  import open_clip  # First: torchvision's ops segfault when imported after TensorFlow.
  import torch
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import bench_small
  from mmcl import models
  from tools import bench_step

  c = bench_small.get_config()
  model = models.get_model(c.model)
  batch = bench_step.random_batch(c, c.batch_size)
  image, text = jnp.asarray(batch['image']), jnp.asarray(batch['text'])
  params = model.init(jax.random.key(0), image[:2], text[:2])['params']
  grad_img = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, image, None)[0]**2)))
  grad_txt = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, None, text)[1]**2)))
  ref = open_clip.model.CLIP(
      embed_dim=256, vision_cfg=dict(image_size=64, layers=6, width=256, head_width=64,
                                     patch_size=8),
      text_cfg=dict(context_length=32, vocab_size=4096, width=256, heads=4, layers=4))
  ref.train()
  t_image = torch.tensor(np.transpose(batch['image'], (0, 3, 1, 2)).copy())
  t_text = torch.tensor(batch['text'].astype(np.int64))

  def ref_grad(encode, x):
    ref.zero_grad(set_to_none=True)
    (encode(x)**2).sum().backward()

  x = jax.random.normal(jax.random.key(1), (128, 65, 256))
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  ln = nn.LayerNorm()
  ln_params = ln.init(jax.random.key(0), x)
  ln_vjp = jax.jit(lambda p, x, g: jax.vjp(ln.apply, p, x)[1](g))
  t_ln = torch.nn.LayerNorm(256)
  t_x = torch.tensor(np.asarray(x), requires_grad=True)
  t_g = torch.tensor(np.asarray(cotangent))

  def torch_ln():
    t_ln.zero_grad(set_to_none=True)
    t_x.grad = None
    t_ln(t_x).backward(t_g)

  ms = alternate({
      'mmcl_image_tower': lambda: jax.block_until_ready(grad_img(params)),
      'open_clip_image_tower': lambda: ref_grad(ref.encode_image, t_image),
      'mmcl_text_tower': lambda: jax.block_until_ready(grad_txt(params)),
      'open_clip_text_tower': lambda: ref_grad(ref.encode_text, t_text),
      'flax_layernorm_vjp': lambda: jax.block_until_ready(ln_vjp(ln_params, x, cotangent)),
      'torch_layernorm_fwd_bwd': torch_ln,
  }, flags.FLAGS.steps)
  print(json.dumps({'unit': 'ms', 'load_average': os.getloadavg()[0], **ms}), flush=True)


if __name__ == '__main__':
  from tools import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see tools/hostmem.py.
  flags.DEFINE_integer('steps', 5, 'Timed calls of each part (after 2 warm-up calls).')
  flags.DEFINE_bool('layouts', False, 'Time the MLP and attention layouts instead (no torch).')
  app.run(main)
