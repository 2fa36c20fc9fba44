"""The two-tower paper recipes' shared body: CLIP, SigLIP and LiT at paper scale.

Each recipe file (clip_b16.py, clip_l14.py, siglip_b16.py, siglip_so400m14.py, lit_b16.py)
states its published hyperparameters and its target TPU slice and calls `recipe`. The
option 'tiny' keeps the recipe's loss, pooling and optimizer but shrinks model, batch and
data to the synthetic shapes, so the tests train every recipe on a CPU.
"""
import ml_collections
from ml_collections import config_dict

from configs import common

OPTIONS = ('tiny',)
# A parameter (and its Adam moments) is sharded over the 'fsdp' axis when the mesh has one.
FSDP_RULES = (('.*', 'fsdp'),)


def recipe(arg: str, *, image: dict, text: dict, embed_dim: int, loss: str, batch_size: int,
           steps: int, lr: float, weight_decay: float, b2: float, warmup_steps: int,
           text_len: int, vocab_size: int, res: int = 224, mesh=(('data', -1),),
           remat: str = 'none', temperature_init: float, max_temperature: float | None,
           bias_init: float | None, loss_impl: str = 'gather') -> ml_collections.ConfigDict:
  options = common.parse_options(arg, OPTIONS, 'recipe')
  tiny = 'tiny' in options
  c = common.base_config()
  c.total_steps = 6 if tiny else steps
  c.batch_size = 32 if tiny else batch_size
  c.image_size = 64 if tiny else res
  c.text_len = 16 if tiny else text_len
  c.lr = lr
  c.optim.b2 = b2
  c.optim.weight_decay = weight_decay
  c.schedule.warmup_steps = 2 if tiny else warmup_steps
  c.log_every = 2 if tiny else 100
  c.ckpt_every = 3 if tiny else 2000
  c.mesh = (('data', -1),) if tiny else mesh
  c.sharding_rules = FSDP_RULES

  c.input.name = 'mmcl_shapes/tiny' if tiny else ''  # Set --config.input.name.
  c.input.shuffle_buffer = 512 if tiny else 250_000
  c.input.pp = (
      'decode|resize({image_size})|value_range(-1, 1)|choice(inkey="captions", outkey="texts")|'
      'tokenize(max_len={text_len}, tokenizer="{tokenizer}", inkey="texts", outkey="text")|'
      'keep("image", "text")')

  c.model.name = 'two_towers'
  # patch_dropout: FLIP (docs/resolution.md), e.g. --config.model.image.patch_dropout=0.5.
  image = dict(image, patch_dropout=0.0)
  c.model.image = ml_collections.ConfigDict(
      dict(image, variant='pico/8') if tiny else image)
  c.model.text = ml_collections.ConfigDict(
      dict(text, variant='pico', vocab_size=258, max_len=c.get_ref('text_len'))
      if tiny else dict(text, vocab_size=vocab_size, max_len=c.get_ref('text_len')))
  c.model.embed_dim = 64 if tiny else embed_dim
  c.model.dtype = 'float32' if tiny else 'bfloat16'
  c.model.remat = remat
  c.model.temperature_init = temperature_init
  c.model.max_temperature = (config_dict.placeholder(float) if max_temperature is None
                             else max_temperature)
  c.model.bias_init = config_dict.placeholder(float) if bias_init is None else bias_init
  c.loss.name = loss
  c.loss.impl = loss_impl

  c.evals.update(common.zeroshot_evals(tiny))
  return c
