r"""CLIP ViT-L/14 at paper scale: softmax loss, batch 32,768, 224 px. Target: v5e:16x16.

Hyperparameters from Radford et al. 2021 (Table 20): as configs/clip_b16.py but lr 4e-4,
a 768-d embedding and a text tower of width 768 with 12 heads (12 layers, 77 tokens).

Fit (tools/compile.py, BENCHMARKS.md section 5): without remat the step asks for ~24 GiB of
temporaries per v5e chip (16 GiB). Full remat of both towers and FSDP of parameters and
Adam state over 16 chips (ICI neighbours) are what this recipe measured to fit.

  python tools/compile.py --config configs/clip_l14.py --topology v5e:16x16
  python tools/train.py --config configs/clip_l14.py:tiny --workdir /tmp/clip_l14_tiny
"""
from configs import image_text

OPTIONS = image_text.OPTIONS


def get_config(arg: str = ''):
  c = image_text.recipe(
      arg, image=dict(variant='L/14', pool='tok'),
      text=dict(variant='B', style='clip'), embed_dim=768, loss='softmax',
      batch_size=32_768, steps=390_625, lr=4e-4, weight_decay=0.2, b2=0.98,
      warmup_steps=2_000, text_len=77, vocab_size=49_408,
      mesh=(('data', -1), ('fsdp', 16)), remat='full',
      temperature_init=1 / 0.07, max_temperature=100.0, bias_init=None)
  return c
