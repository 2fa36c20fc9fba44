r"""LiT B/16: a locked, pre-trained ViT-B/16 image tower and a B text tower trained against
it (softmax loss), batch 32,768, 224 px. Target: v5e:16x16.

Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning": the image tower
is pre-trained and frozen ("locked", no weight decay or updates), the text tower trained
from scratch with the contrastive loss at batch 32k; lr 1e-3, weight decay 1e-4, cosine
schedule with 10k warmup steps, 16 text tokens from a 32k SentencePiece vocabulary, image
ViT-B/16 with its classification-style head replaced by a 768-d projection. Run length:
(our choice) 18B examples seen was the paper's longest; 60,000 steps (2B) here.

The image tower comes from a checkpoint: `--config.model_init=<.npz from tools/convert.py
or workdir/ckpt/step>`; `config.model_init_dont_load` keeps the text tower and heads fresh.

  python tools/compile.py --config configs/lit_b16.py --topology v5e:16x16
  python tools/train.py --config configs/lit_b16.py --workdir gs://bucket/lit_b16 \
      --config.model_init=/path/to/vit_b16.npz ...
  python tools/train.py --config configs/lit_b16.py:tiny --workdir /tmp/lit_b16_tiny
"""
from configs import image_text

OPTIONS = image_text.OPTIONS


def get_config(arg: str = ''):
  c = image_text.recipe(
      arg, image=dict(variant='B/16', pool='tok'),
      text=dict(variant='B', style='siglip'), embed_dim=768, loss='softmax',
      batch_size=32_768, steps=60_000, lr=1e-3, weight_decay=1e-4, b2=0.999,
      warmup_steps=10_000, text_len=16, vocab_size=32_000,
      temperature_init=10.0, max_temperature=None, bias_init=None)
  c.optim.freeze = 'img/.*'  # Locked image tower (Adam keeps no state for it).
  c.model_init_dont_load = ('txt/.*', 't')  # From the image checkpoint: the image tower only.
  return c
