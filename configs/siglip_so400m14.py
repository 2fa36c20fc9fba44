r"""SigLIP So400m/14 at paper scale: sigmoid loss, batch 32,768, 224 px. Target: v5e:16x16.

The shape-optimised ViT (Alabdulmohsin et al. 2023, "Getting ViT in Shape": width 1152,
depth 27, MLP 4304, 16 heads) in both towers, as released with SigLIP (big_vision's
`siglip_so400m_patch14_224`: 1152-d embedding, 16 text tokens, 32k vocabulary); training
hyperparameters as configs/siglip_b16.py (Zhai et al. 2023).

Fit (tools/compile.py, BENCHMARKS.md section 5): with pure data parallelism the step is
refused (31.25 GiB of temporaries per 16 GiB chip) and full remat alone leaves no margin
(~16.3 GiB: 9.7 GiB of it replicated parameters and Adam state). Full remat plus FSDP of
parameters and Adam state over 16 chips is what this recipe measured to fit.

  python tools/compile.py --config configs/siglip_so400m14.py --topology v5e:16x16
  python tools/train.py --config configs/siglip_so400m14.py:tiny --workdir /tmp/so400m_tiny
"""
from configs import image_text

OPTIONS = image_text.OPTIONS


def get_config(arg: str = ''):
  return image_text.recipe(
      arg, image=dict(variant='So400m/14', pool='map'),
      text=dict(variant='So400m', style='siglip'), embed_dim=1152, loss='sigmoid',
      batch_size=32_768, steps=274_658, lr=1e-3, weight_decay=1e-4, b2=0.95,
      warmup_steps=13_733, text_len=16, vocab_size=32_000,
      mesh=(('data', -1), ('fsdp', 16)), remat='full',
      temperature_init=10.0, max_temperature=None, bias_init=-10.0)
