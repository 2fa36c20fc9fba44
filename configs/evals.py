r"""Standard evaluation suites for `config.evals`, shared by recipes.

  c.evals.update(evals.imagenet_suite())                 # zero-shot ImageNet and variants
  c.evals.update(evals.retrieval_suite())                # COCO (Karpathy test) retrieval
  c.evals.update(evals.probe_suite(['cifar10']))         # few-shot ridge probes

Datasets are read from `config.data_dir` (TFDS); see docs/evaluation.md for preparing them.
`{image_size}` in pp strings is filled from the config when the evaluators are built.
"""

# CLIP's eval transform: shorter side to the model's size (bicubic), central square crop.
PP_CLIP = 'decode|resize_small({image_size})|central_crop({image_size})|value_range(-1, 1)'
IMAGENET = ('imagenet2012', 'imagenet_v2', 'imagenet2012_real', 'imagenet_a', 'imagenet_r',
            'imagenet_sketch')


def imagenet_suite(datasets=IMAGENET, prompts: str = 'clip80', every: int = 0,
                   batch_size: int = 512, pp_img: str = PP_CLIP, lowercase: bool = False,
                   strip_punctuation: bool = False) -> dict:
  """One zero-shot evaluator: every ImageNet variant shares one 1000-class classifier.

  prompts=None keeps each dataset's own protocol (see mmcl/evaluate/zeroshot.py DATASETS).
  """
  cfg = dict(type='zeroshot', every=every, datasets=list(datasets), batch_size=batch_size,
             pp_img=pp_img, lowercase=lowercase, strip_punctuation=strip_punctuation)
  if prompts is not None:
    cfg['prompts'] = prompts
  return {'zeroshot_imagenet': cfg}


def small_zeroshot_suite(datasets=('cifar10', 'cifar100', 'oxford_iiit_pet'), prompts=None,
                         **kw) -> dict:
  """CIFAR-10/100 and pets with CLIP's own class names and templates for each."""
  return {'zeroshot_small': imagenet_suite(datasets, prompts, **kw)['zeroshot_imagenet']}


def retrieval_suite(dataset: str = 'coco_captions', every: int = 0, batch_size: int = 512,
                    pp_img: str = PP_CLIP) -> dict:
  name = dataset.split('/')[0].split(':')[0]
  return {f'retrieval_{name}': dict(type='retrieval', every=every, dataset=dataset,
                                    batch_size=batch_size, pp_img=pp_img),
          f'geometry_{name}': dict(type='geometry', every=every, dataset=dataset,
                                   batch_size=batch_size, pp_img=pp_img)}


def probe_suite(datasets=('cifar10', 'cifar100'), shots=(1, 5, 10, 25), seeds: int = 3,
                every: int = 0, batch_size: int = 512, pp_img: str = PP_CLIP) -> dict:
  return {f'probe_{d}': dict(type='probe', every=every, dataset=d, shots=tuple(shots),
                             seeds=seeds, batch_size=batch_size, pp_img=pp_img)
          for d in datasets}
