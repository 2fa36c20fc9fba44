r"""SigLIP 2 ViT-B/16 at paper scale: sigmoid loss + LocCa decoder, 256 px. Target: v5e:16x16.

Hyperparameters from Tschannen et al. 2025, "SigLIP 2: Multilingual Vision-Language Encoders
with Improved Semantic Understanding, Localization, and Dense Features": batch 32k, cosine
schedule with 20k warmup steps, 40B examples seen (1,220,703 steps), patch 16 at 256 px (256
image tokens), 64 text tokens from the Gemma tokenizer (256k vocabulary), image and text
towers of the same B size with a MAP head, learned temperature and bias as SigLIP (t' = log
10, b = -10), Adam lr 1e-3 with decoupled weight decay 1e-4. The LocCa decoder has the text
tower's shape with half its layers (6 of 12, our reading of sec. 2.2), cross-attends to the
un-pooled image tokens and is trained on captioning, referring expressions and grounded
captioning (tasks sampled per example) with weight 1 beside the sigmoid loss. Fully sharded
(FSDP) over 16 chips within the data-parallel mesh, full remat, 8 GradCache micro-batches
(below). Compiled for v5e:16x16 by tools/compile.py on 2026-12-02: 6.15 of 16 GiB per chip
(62% spare; BENCHMARKS.md section 5). ':distill' adds the EMA teacher, self-distillation and
masked prediction of the last 20% of training (SILC + TIPS, docs/siglip2.md): 6.30 GiB per
chip on v5e:16x16 (2026-12-03), its step 2.4x the model FLOPs of the step without them.

Point config.tokenizer at the Gemma SentencePiece model ('sp:/path/tokenizer.model') and
config.input.name at an image-text dataset with `objects/bbox` and `objects/caption` (region
boxes and captions, e.g. from an open-vocabulary detector as in the paper).

  python tools/compile.py --config configs/siglip2_b16.py --topology v5e:16x16
  python tools/compile.py --config configs/siglip2_b16.py:distill --topology v5e:16x16
  python tools/train.py --config configs/siglip2_b16.py:tiny --workdir /tmp/siglip2_b16_tiny
"""
import ml_collections

from configs import common, image_text

OPTIONS = image_text.OPTIONS + ('distill',)
NUM_BINS = 500  # Coordinate tokens per box coordinate (our choice; LocCa writes boxes as tokens).


def get_config(arg: str = ''):
  options = common.parse_options(arg, OPTIONS, 'siglip2_b16')
  c = image_text.recipe(
      ','.join(sorted(options - {'distill'})), image=dict(variant='B/16', pool='map'),
      text=dict(variant='B', style='siglip'), embed_dim=768, loss='sigmoid',
      batch_size=32_768, steps=1_220_703, lr=1e-3, weight_decay=1e-4, b2=0.95,
      warmup_steps=20_000, text_len=64, vocab_size=256_000, res=256,
      mesh=(('data', -1), ('fsdp', 16)), remat='full',
      temperature_init=10.0, max_temperature=None, bias_init=-10.0)
  tiny = 'tiny' in options
  text_vocab = 258 if tiny else 256_000
  bins = 16 if tiny else NUM_BINS
  c.decoder_len = 32 if tiny else 64
  # The paper spreads the 32k batch over 2,048 v5e chips (16 examples each); on 256 chips the
  # decoder's 256k-way logits of 128 examples x 64 tokens would take 8.4 GB in float32 per
  # chip, twice with their gradient. GradCache micro-batches of 4,096 (same gradient, every
  # negative kept: mmcl/train/grad_cache.py) keep 16 examples per chip in flight.
  c.accum_steps = 1 if tiny else 8
  c.contrastive_weight = 1.0
  c.model.decoder = ml_collections.ConfigDict(dict(
      variant='pico' if tiny else 'B', depth=1 if tiny else 6, vocab_size=text_vocab + bins,
      max_len=c.get_ref('decoder_len'), tie_embedding=False, parallel_prob=0.0,
      loss_weight=1.0))
  c.input.pp = (
      'decode|resize({image_size})|value_range(-1, 1)|choice(inkey="captions", outkey="texts")|'
      'tokenize(max_len={text_len}, tokenizer="{tokenizer}", inkey="texts", outkey="text")|'
      f'decoder_tasks(max_len={c.decoder_len}, tokenizer="{{tokenizer}}", num_bins={bins})|'
      'keep("image", "text", "dec_tokens", "dec_loss_mask")')
  if 'distill' in options:
    # SigLIP 2's last 20%: SILC and TIPS against an EMA teacher, with B's weights (1 and
    # 0.25, x 0.25 for B); SILC's 8 local crops, at DINO's 96 px (6 x 6 patches). The terms
    # run in the 8 GradCache micro-batches too (config.self_distill.accum_steps): unsplit,
    # the patch head's [128 x 256 x 65,536] float32 logits per chip would take 8.6 GB.
    common.add_self_distill(c, num_local=2 if tiny else 8, local_size=32 if tiny else 96,
                            local_weight=0.25, masked_weight=0.0625, decay=0.996)
    if tiny:  # Two micro-batches, so the smoke test runs the split terms.
      c.self_distill.update(hidden=64, bottleneck=32, prototypes=256, accum_steps=2)
  return c
