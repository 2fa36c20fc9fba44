r"""bench_small: the reference CLIP two-tower for speed comparisons with open_clip (BENCHMARKS.md).

ViT 64 px, patch 8, width 256, 6 layers, 4 heads, MLP 1024, class-token pooling; text tower
context 32, vocab 4,096, width 256, 4 layers, 4 heads, MLP 1024, causal with EOT pooling;
embedding 256; softmax loss; AdamW; float32; global batch 128. The same model in open_clip:
open_clip.model.CLIP(embed_dim=256, vision_cfg=dict(image_size=64, layers=6, width=256,
head_width=64, patch_size=8), text_cfg=dict(context_length=32, vocab_size=4096, width=256,
heads=4, layers=4)).

  python tools/bench_step.py --config configs/bench_small.py --reference open_clip
  python tools/bench_input.py --config configs/bench_small.py
  python tools/train.py --config configs/bench_small.py --workdir /tmp/bench_small

'tiny': batch 16, 2 + 1 layers, for smoke tests of the benchmark tools.
"""
import ml_collections
from ml_collections import config_dict

from configs import common

OPTIONS = ('tiny',)


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  options = common.parse_options(arg, OPTIONS, 'bench_small')
  tiny = 'tiny' in options

  c = common.base_config()
  c.total_steps = 20 if tiny else 1000
  c.batch_size = 16 if tiny else 128
  c.image_size = 64
  c.text_len = 32
  c.lr = 1e-3
  c.schedule.warmup_steps = 5 if tiny else 100
  c.input.name = 'mmcl_shapes/tiny' if tiny else 'mmcl_shapes'
  c.input.shuffle_buffer = 512 if tiny else 10_000
  c.input.pp = ('decode|value_range(-1, 1)|choice(inkey="captions", outkey="texts")|'
                'tokenize(max_len={text_len}, tokenizer="{tokenizer}", inkey="texts", '
                'outkey="text")|keep("image", "text")')

  tower = dict(width=256, mlp_dim=1024, num_heads=4)
  c.model.image = ml_collections.ConfigDict(
      dict(tower, depth=2 if tiny else 6, patch_size=8, pool='tok'))
  c.model.text = ml_collections.ConfigDict(
      dict(tower, depth=1 if tiny else 4, style='clip', vocab_size=4096,
           max_len=c.get_ref('text_len')))
  c.model.embed_dim = 256
  c.model.dtype = 'float32'
  c.model.remat = 'none'  # Or 'full', 'dots', 'dots_no_batch' (transformer.REMAT_POLICIES).
  c.model.scan = False  # nn.scan over layers: faster compiles of deep towers.
  c.model.temperature_init = 1 / 0.07  # CLIP's init and clamp, as in open_clip.
  c.model.max_temperature = 100.0
  c.model.bias_init = config_dict.placeholder(float)
  c.loss.name = 'softmax'
  c.optim.name = 'adamw'
  return c
