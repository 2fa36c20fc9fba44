r"""CLIP ViT-B/16 at paper scale: softmax loss, batch 32,768, 224 px. Target: v5e:16x16.

Hyperparameters from Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision" (Table 20 and section 2.5): 32 epochs of 400M pairs at batch 32,768
(390,625 steps), AdamW lr 5e-4, beta2 0.98, eps 1e-6, weight decay 0.2 (not on gains or
biases), cosine decay after 2,000 warmup steps, temperature initialised at 1/0.07 and
clipped at 100; image: ViT-B/16, class-token pooling, 512-d embedding; text: 12 layers,
width 512, 8 heads, causal, pooled at the end-of-text token, 77 tokens, 49,408 BPE words.

Fit (tools/compile.py, BENCHMARKS.md section 5): pure data parallelism over the 256 chips of
a v5e-256 needs neither remat nor FSDP.

  python tools/compile.py --config configs/clip_b16.py --topology v5e:16x16
  python tools/train.py --config configs/clip_b16.py --workdir gs://bucket/clip_b16 \
      --config.input.name=<tfds image-text dataset> --config.data_dir=<tfds data_dir> \
      --config.tokenizer=sp:/path/to/bpe.model
  python tools/train.py --config configs/clip_b16.py:tiny --workdir /tmp/clip_b16_tiny
"""
from configs import image_text

OPTIONS = image_text.OPTIONS


def get_config(arg: str = ''):
  return image_text.recipe(
      arg, image=dict(variant='B/16', pool='tok'),
      text=dict(variant='M', style='clip'), embed_dim=512, loss='softmax',
      batch_size=32_768, steps=390_625, lr=5e-4, weight_decay=0.2, b2=0.98,
      warmup_steps=2_000, text_len=77, vocab_size=49_408,
      temperature_init=1 / 0.07, max_temperature=100.0, bias_init=None)
