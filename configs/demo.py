r"""Demo: a small CLIP (or SigLIP) trained on the built-in synthetic `mmcl_shapes` dataset.

Runs on a 2-core CPU in minutes and reports zero-shot accuracy on shape, colour and
held-out colour+shape combinations, plus retrieval on the test split:

  python tools/train.py --config configs/demo.py --workdir /tmp/mmcl_demo
  python tools/train.py --config configs/demo.py:siglip --workdir /tmp/mmcl_demo_siglip
  python tools/train.py --config configs/demo.py --workdir /tmp/w --config.total_steps=30
  python tools/train.py --config configs/demo.py:siglip,distill --workdir /tmp/mmcl_distill
  python tools/train.py --config configs/demo.py:naflex --workdir /tmp/mmcl_naflex

The argument is a comma-separated list of options: 'clip' (default) or 'siglip' picks the
loss; 'tiny' shrinks the models and data to a smoke test that runs in seconds (tests);
'distill' adds SigLIP 2's self-distillation and masked prediction with an EMA teacher for
the last 20% of training (docs/siglip2.md); 'naflex' trains on NaFlex patches (each image
at its own aspect ratio as up to 16 tokens; tiny: 16 or 64 drawn per example) and reports
zero-shot at 4, 9 and 16 tokens (tiny: 16, 64), zeroshot/mmcl_shapes/budget<L>/...
(docs/resolution.md).
"""
import ml_collections
from ml_collections import config_dict

from configs import common

OPTIONS = ('clip', 'siglip', 'tiny', 'distill', 'naflex')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  options = common.parse_options(arg, OPTIONS, 'demo')
  if {'clip', 'siglip'} <= options:
    raise ValueError(f'Bad demo options {arg!r}: clip or siglip, not both.')
  siglip, tiny = 'siglip' in options, 'tiny' in options
  dataset = 'mmcl_shapes/tiny' if tiny else 'mmcl_shapes'

  c = common.base_config()
  c.total_steps = 20 if tiny else 2000
  c.batch_size = 32 if tiny else 128  # Learns more per second than 256 (DESIGN_NOTES.md).
  c.image_size = 64
  c.text_len = 48  # Bytes; longer two-object captions are cut (EOS kept).
  c.lr = 2e-3
  c.schedule.warmup_steps = 5 if tiny else 100
  c.optim.weight_decay = 0.05
  c.log_every = 5 if tiny else 20
  c.ckpt_every = 10 if tiny else 500

  c.input.name = dataset
  c.input.shuffle_buffer = 512 if tiny else 10_000
  # {text_len} and {tokenizer} are filled from the config, so overrides stay consistent.
  c.input.pp = ('decode|value_range(-1, 1)|choice(inkey="captions", outkey="texts")|'
                'tokenize(max_len={text_len}, tokenizer="{tokenizer}", inkey="texts", '
                'outkey="text")|keep("image", "text")')

  # patch_dropout (FLIP), posemb_grid and apply_patch_size (FlexiViT): docs/resolution.md.
  c.model.image = ml_collections.ConfigDict(
      dict(variant='pico/8' if tiny else 'nano/16', pool='gap', patch_dropout=0.0,
           posemb_grid=config_dict.placeholder(int),
           apply_patch_size=config_dict.placeholder(int)))
  c.model.text = ml_collections.ConfigDict(
      dict(variant='pico', depth=None if tiny else 1, style='siglip' if siglip else 'clip', vocab_size=258,
           max_len=c.get_ref('text_len')))
  c.model.embed_dim = 64 if tiny else 128
  c.model.dtype = 'float32'
  c.model.remat = 'none'  # Or 'full', 'dots', 'dots_no_batch' (transformer.REMAT_POLICIES).
  c.model.scan = False  # nn.scan over layers: faster compiles of deep towers.
  if siglip:
    c.loss.name = 'sigmoid'
    c.model.temperature_init = 10.0
    c.model.max_temperature = config_dict.placeholder(float)
    c.model.bias_init = -10.0
  else:
    c.loss.name = 'softmax'
    c.model.temperature_init = 1 / 0.07
    c.model.max_temperature = 100.0
    c.model.bias_init = config_dict.placeholder(float)  # No bias; settable by flag.

  pp_img = 'decode|value_range(-1, 1)'
  c.evals.zeroshot = dict(
      type='zeroshot', every=0, dataset=dataset, split='test', pp_img=pp_img, batch_size=256,
      tasks=dict(
          shape=dict(label_key='shape', prompts='mmcl_shapes/shape',
                     where={'num_objects': 1}),
          color=dict(label_key='color', prompts='mmcl_shapes/color',
                     where={'num_objects': 1}),
          # Colour+shape pairs never seen in training: compositional generalisation.
          combo=dict(label_key='combo', prompts='mmcl_shapes/combo',
                     where={'num_objects': 1, 'combo': _heldout_combo_ids()}),
      ))
  c.evals.retrieval = dict(type='retrieval', every=0, dataset=dataset, split='test',
                           pp_img=pp_img, batch_size=256)
  # Few-shot ridge probes of the image tower on shape (penalty chosen on 5 more images per
  # class) and the modality-gap diagnostics. Small slices keep the demo's eval phase short;
  # whole batches of 256 reuse the compiled embedding function (no new remainder shapes).
  c.evals.probe = dict(type='probe', every=0, dataset=dataset, label_key='shape',
                       train_split='train' if tiny else 'train[:512]',
                       test_split='test' if tiny else 'test[:1024]', shots=(1, 5, 10),
                       seeds=2, pp_img=pp_img, batch_size=256)
  c.evals.geometry = dict(type='geometry', every=0, dataset=dataset,
                          split='test' if tiny else 'test[:1024]', pp_img=pp_img,
                          batch_size=256)
  if {'distill', 'naflex'} <= options:
    raise ValueError('The demo options naflex and distill do not combine (NaFlex has no '
                     'fixed-size views to distill).')
  if 'distill' in options:
    add_self_distill(c, tiny)
  if 'naflex' in options:
    add_naflex(c, tiny)
  return c


def add_self_distill(c: ml_collections.ConfigDict, tiny: bool) -> ml_collections.ConfigDict:
  """The demo's SigLIP 2 self-distillation, added after `c.input.pp` is final."""
  # SigLIP 2's B-size weights: (1, 0.25) x 0.25. Fewer, smaller local crops than SILC's
  # 8 (CPU time); a small head; decay 0.99 so the teacher moves within the last 20%.
  c.self_distill.update(hidden=256, bottleneck=64, prototypes=1024)
  return common.add_self_distill(c, num_local=2 if tiny else 4, local_size=32,
                                 local_weight=0.25, masked_weight=0.0625, decay=0.99)


def add_naflex(c: ml_collections.ConfigDict, tiny: bool) -> ml_collections.ConfigDict:
  """NaFlex: sequences of the full 64 px grid's token count (nano/16: 4 x 4; tiny's pico/8:
  8 x 8) and zero-shot at it and at fewer tokens (the same images resized down). Training
  at several budgets (config.naflex.draw) learned shape much more slowly here
  (docs/resolution.md), so the demo trains at one; tiny draws per example, so the smoke test
  runs that path."""
  p = 8 if tiny else 16
  budgets = (16, 64) if tiny else (4, 9, 16)
  c.naflex.budget, c.naflex.draw = (64 // p)**2, budgets if tiny else ()
  c.evals.zeroshot.naflex = dict(patch_size=p, budgets=budgets)
  return c


def _heldout_combo_ids() -> list[int]:
  from mmcl.data import shapes
  return [shapes.COLORS.index(color) * len(shapes.SHAPES) + shapes.SHAPES.index(shape)
          for color, shape in shapes.HELDOUT_COMBOS]
