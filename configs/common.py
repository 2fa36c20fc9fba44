"""The base config every recipe starts from. Every setting has a default that runs on a CPU."""
import ml_collections
from ml_collections import config_dict


def parse_options(arg: str | None, valid: tuple[str, ...], recipe: str) -> set[str]:
  """The comma-separated options of `--config configs/R.py:a,b`, each checked against `valid`."""
  options = {o for o in (arg or '').split(',') if o}
  if options - set(valid):
    raise ValueError(f'Bad {recipe} options {sorted(options - set(valid))} in {arg!r}; '
                     f'valid: {valid}.')
  return options


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256  # Global, over all processes and devices.
  # TFDS data_dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data_dir = config_dict.placeholder(str)
  c.tokenizer = 'bytes'  # Or 'sp:/path/to/model.model'.
  c.image_size = 64  # Image side after preprocessing.
  c.text_len = 64

  c.input = ml_collections.ConfigDict()
  c.input.name = 'mmcl_shapes'  # TFDS name, or 'wds:/shards/*.tar', 'csv:/data/train.tsv'.
  c.input.mixture = ()  # Or weighted sources ((name, weight), ...), used instead of name.
  # How 'csv:' files are read (mmcl/data/csv_files.py); None = open_clip's default: tab
  # separator whatever the extension ('sniff', ',', ...), columns filepath and title,
  # relative image paths from the CSV's directory (root='.': the working directory).
  # Applies to every 'csv:' source of name and mixture; evaluators take their own csv=dict().
  c.input.csv = ml_collections.ConfigDict({k: config_dict.placeholder(str) for k in (
      'separator', 'img_key', 'caption_key', 'label_key', 'root')})
  c.input.split = 'train'
  c.input.shuffle_buffer = 10_000
  c.input.cache = False
  # Records in a row dropped (wrong shape, undecodable) before the run stops, naming why:
  # a stream that keeps nothing (e.g. image_size not matching the pp string) would hang.
  # 0: no limit (a SIGTERM still ends the wait).
  c.input.max_dropped_in_a_row = 10_000
  # Data shards (one tf.data pipeline each); None = one per process. The stream depends on
  # the shard count only, so fix it to resume a run under a different number of processes.
  c.input.shards = config_dict.placeholder(int)
  c.input.pp = ''  # Set by recipes; see mmcl/data/preprocess.py for the ops.

  # Tuples (not lists) so that `--config.mesh="(('data', 4), ('fsdp', 2))"` can override.
  c.mesh = (('data', -1),)
  c.sharding_rules = (('.*', 'fsdp'),)  # 'fsdp' is a no-op without an 'fsdp' mesh axis.

  c.model = ml_collections.ConfigDict()
  c.model.name = 'two_towers'

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'softmax'
  c.loss.impl = 'gather'  # 'global' | 'gather' | 'ring' (O(b) memory; see mmcl/losses/ring.py).
  c.loss.chunk = 1024  # Ring tile side.
  c.loss.extras = ml_collections.ConfigDict()  # Loss input name -> batch key, e.g. labels.
  # Scale t of the logits: 'learned' (the model's), 'fixed' (value) or 'cosine'/'linear'
  # from init to end over the run.
  c.temperature = ml_collections.ConfigDict(
      dict(type='learned', value=config_dict.placeholder(float),
           init=config_dict.placeholder(float), end=config_dict.placeholder(float)))
  c.accum_steps = 1  # GradCache micro-batches: same gradient, less activation memory.
  # Resolution and tokens (docs/resolution.md; mmcl/train/variants.py): FLIP's unmasked
  # final phase starts at this step (0: never), and FlexiViT's per-step patch sizes.
  c.unmasked_from_step = 0
  c.flexi_patch_sizes = ()
  # NaFlex (SigLIP 2, docs/resolution.md): each image at its own aspect ratio as up to
  # `budget` patch tokens (None: off, fixed image_size); with `draw` = budgets (<= budget),
  # each example's grid is for one drawn from them, padded to `budget`.
  # mmcl/train/naflex_input.py.
  c.naflex = ml_collections.ConfigDict(dict(budget=config_dict.placeholder(int), draw=()))

  c.lr = 1e-3
  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0
  c.optim.mu_dtype = 'float32'  # Or 'bfloat16': Adam's first moment in half the bytes.
  c.optim.freeze = ''  # Regex of frozen parameters, e.g. 'img/.*' for LiT.
  # Start from weights (fine-tuning, LiT): a .npz from tools/convert.py or <workdir>/ckpt/<step>.
  c.model_init = ''
  c.model_init_dont_load = ()  # Regexes of params kept freshly initialised, e.g. 'img/head/.*'.
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 100
  c.schedule.end_factor = 0.0

  # EMA of the parameters (mmcl/train/ema.py): decay None = off (no 'ema' in the state).
  # start_step None: the self-distillation's start (else 0); before it the EMA copies the
  # parameters. eval=True: evaluators (and tools/eval.py) use the EMA weights.
  c.ema = ml_collections.ConfigDict(dict(
      decay=config_dict.placeholder(float), start_step=config_dict.placeholder(int),
      eval=False))
  # SigLIP 2's self-distillation (mmcl/train/distill.py, docs/siglip2.md): off while both
  # weights are 0. Needs config.ema.decay and the views in config.input.pp.
  c.self_distill = ml_collections.ConfigDict(dict(
      local_weight=0.0,  # SILC local-to-global; SigLIP 2: 1 x size factor (B: 0.25).
      masked_weight=0.0,  # TIPS masked prediction; SigLIP 2: 0.25 x size factor.
      start_fraction=0.8,  # SigLIP 2: the last 20% of training.
      global_key='global_view', local_key='local_crops',  # Batch keys of the views.
      global_size=config_dict.placeholder(int),  # None: image_size.
      local_size=config_dict.placeholder(int),  # None: the global size.
      num_local=8,  # SILC: 8 local crops.
      mask_ratio=0.5,  # SigLIP 2: half of the student's patches.
      hidden=2048, bottleneck=256, prototypes=65_536,  # DINO's head.
      student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,  # DINO.
      # Micro-batches of the terms (None: config.accum_steps); the same value and gradient,
      # 1/k of the patch head's [B, N, prototypes] logits in memory at once.
      accum_steps=config_dict.placeholder(int)))

  c.log_every = 10
  c.preemption_check_every = 10  # Steps between the processes' SIGTERM agreement (multi-process).
  c.max_skipped_steps = 10  # Consecutive non-finite updates (skipped) before the run stops.
  c.ckpt_every = 500
  c.ckpt_keep = 3
  c.progress_bar = True
  # jax.profiler traces of `num_steps` steps from each of `steps` (e.g. (100, 5000)), into
  # <workdir>/tb (TensorBoard's profile plugin), with the op summary printed; by process 0
  # ('first') or every process ('all'). mmcl/train/profile.py.
  c.profile = ml_collections.ConfigDict(dict(steps=(), num_steps=3, processes='first'))
  # The log's rows also to Weights & Biases (pip install 'mmcl[wandb]'); mode: 'online',
  # 'offline' or None ($WANDB_MODE). A resumed run continues its W&B run (mmcl/train/wandb_run.py).
  c.wandb = ml_collections.ConfigDict(dict(
      enabled=False, project='mmcl', entity=config_dict.placeholder(str),
      name=config_dict.placeholder(str), mode=config_dict.placeholder(str)))
  c.evals = ml_collections.ConfigDict()
  return c


def zeroshot_evals(tiny: bool) -> dict:
  """The paper recipes' evaluation: zero-shot ImageNet every 10k steps, or for ':tiny'
  the synthetic shapes' test split at the end."""
  if tiny:
    return {'zeroshot': dict(
        type='zeroshot', every=0, dataset='mmcl_shapes/tiny', split='test',
        pp_img='decode|value_range(-1, 1)', batch_size=256,
        tasks=dict(shape=dict(label_key='shape', prompts='mmcl_shapes/shape')))}
  return {'imagenet': dict(
      type='zeroshot', every=10_000, datasets=['imagenet2012'], batch_size=1024,
      pp_img='decode|resize({image_size})|value_range(-1, 1)')}


def add_self_distill(c: ml_collections.ConfigDict, *, num_local: int, local_size: int,
                     local_weight: float, masked_weight: float, decay: float,
                     global_area=(40, 100), local_area=(5, 40)) -> ml_collections.ConfigDict:
  """Switches on SigLIP 2's self-distillation (docs/siglip2.md) in recipe `c`: the EMA
  teacher, both terms, and the views made after `decode` in `c.input.pp` (SILC's crop
  ranges: global views of 40-100% of the image area, local crops of 5-40%)."""
  if not c.input.pp.startswith('decode|'):
    raise ValueError(f'add_self_distill: config.input.pp must start with "decode|", got '
                     f'{c.input.pp!r}.')
  sd = c.self_distill
  sd.local_weight, sd.masked_weight = local_weight, masked_weight
  sd.num_local, sd.local_size = num_local, local_size
  c.ema.decay = decay
  g, l = sd.global_key, sd.local_key
  views = (f'inception_crop({{image_size}}, {global_area[0]}, {global_area[1]}, outkey="{g}")|'
           f'value_range(-1, 1, key="{g}")|')
  keep = f'"{g}"'
  if local_weight:
    views += (f'inception_crops({num_local}, {local_size}, {local_area[0]}, {local_area[1]}, '
              f'outkey="{l}")|value_range(-1, 1, key="{l}")|')
    keep += f', "{l}"'
  pp = 'decode|' + views + c.input.pp[len('decode|'):]
  if not pp.endswith(')') or '|keep(' not in pp:
    raise ValueError(f'add_self_distill: config.input.pp must end with keep(...), got {pp!r}.')
  c.input.pp = pp[:-1] + ', ' + keep + ')'
  return c
