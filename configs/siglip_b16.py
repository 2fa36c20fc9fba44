r"""SigLIP ViT-B/16 at paper scale: sigmoid loss, batch 32,768, 224 px. Target: v5e:16x16.

Hyperparameters from Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"
(section 4 and big_vision's SigLIP configs): batch 32k, lr 1e-3, weight decay 1e-4, Adam
beta2 0.95 ("for stability"), learned temperature initialised at t' = log 10 and bias at
-10, 16 text tokens from a 32k SentencePiece vocabulary; image ViT-B/16 with a MAP head,
text B-size, last-token pooling, 768-d embedding. Run length: 9B examples seen (274,658
steps; the paper trains B/16 for several lengths, this is one). Warmup 5% (our choice).

Fit (tools/compile.py, BENCHMARKS.md section 5): pure data parallelism over 256 v5e chips.

  python tools/compile.py --config configs/siglip_b16.py --topology v5e:16x16
  python tools/train.py --config configs/siglip_b16.py:tiny --workdir /tmp/siglip_b16_tiny
"""
from configs import image_text

OPTIONS = image_text.OPTIONS


def get_config(arg: str = ''):
  return image_text.recipe(
      arg, image=dict(variant='B/16', pool='map'),
      text=dict(variant='B', style='siglip'), embed_dim=768, loss='sigmoid',
      batch_size=32_768, steps=274_658, lr=1e-3, weight_decay=1e-4, b2=0.95,
      warmup_steps=13_733, text_len=16, vocab_size=32_000,
      temperature_init=10.0, max_temperature=None, bias_init=-10.0)
