r"""Standard evaluation suites for `config.evals`, shared by recipes.

  c.evals.update(evals.imagenet_suite())                 # zero-shot ImageNet and variants
  c.evals.update(evals.retrieval_suite())                # COCO (Karpathy test) retrieval
  c.evals.update(evals.flickr30k_retrieval('/data/flickr30k'))  # Karpathy test, released files
  c.evals.update(evals.probe_suite(['cifar10']))         # few-shot ridge probes
  c.evals.update(evals.compositionality_suite('/data/compositionality'))  # released files
  c.evals.update(evals.xm3600('/data/xm3600'))           # 36-language retrieval
  c.evals.update(evals.linear_probe_suite(['cifar10']))  # CLIP's logistic-regression probe
  c.evals.update(evals.zeroshot_suite())                 # CLIP/DataComp zero-shot suite + mean

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


def flickr30k_retrieval(root: str, split: str = 'test', every: int = 0, batch_size: int = 512,
                        pp_img: str = PP_CLIP) -> dict:
  """Flickr30k retrieval on Karpathy's split (the CLIP paper's: 1,000 test images) from the
  released files: root/dataset_flickr30k.json and root/flickr30k-images/ (TFDS has none)."""
  return {'retrieval_flickr30k': dict(
      type='karpathy_retrieval', every=every, annotations=f'{root}/dataset_flickr30k.json',
      image_dir=f'{root}/flickr30k-images', split=split, name='flickr30k',
      batch_size=batch_size, pp_img=pp_img)}


def probe_suite(datasets=('cifar10', 'cifar100'), shots=(1, 5, 10, 25), seeds: int = 3,
                every: int = 0, batch_size: int = 512, pp_img: str = PP_CLIP) -> dict:
  return {f'probe_{d}': dict(type='probe', every=every, dataset=d, shots=tuple(shots),
                             seeds=seeds, batch_size=batch_size, pp_img=pp_img)
          for d in datasets}


def compositionality_suite(root: str, tasks=('sugarcrepe', 'aro', 'winoground'), every: int = 0,
                           batch_size: int = 512, pp_img: str = PP_CLIP, **kw) -> dict:
  """SugarCrepe, ARO and Winoground from their released files under `root`.

  Layout (docs/evaluation.md): root/sugarcrepe/{<category>.json, val2017/},
  root/aro/{visual_genome_*.json, images/, coco_karpathy_test.json, val2014/, ...},
  root/winoground/{examples.jsonl, images/}. `kw` go to every evaluator (e.g. lowercase).
  """
  types = ('sugarcrepe', 'aro', 'winoground')
  unknown = sorted(set(tasks) - set(types))
  if unknown:
    raise ValueError(f'Unknown compositionality tasks {unknown}; valid: {list(types)}.')
  return {t: dict(type=t, every=every, root=f'{root}/{t}', batch_size=batch_size,
                  pp_img=pp_img, **kw) for t in tasks}


def xm3600(root: str, languages=None, every: int = 0, batch_size: int = 512,
           pp_img: str = PP_CLIP, **kw) -> dict:
  """Crossmodal-3600 retrieval per language (default all 36) from root/{captions.jsonl,
  images/}; texts use the config's tokenizer (a multilingual 'sp:/path/model.model')."""
  from mmcl.evaluate import xm3600 as xm3600_lib  # Lazy: configs import no TF otherwise.
  return {'xm3600': dict(type='xm3600', every=every, root=root, batch_size=batch_size,
                         pp_img=pp_img, languages=list(languages or xm3600_lib.LANGUAGES),
                         **kw)}


def linear_probe_suite(datasets=('cifar10', 'cifar100'), every: int = 0,
                       batch_size: int = 512, pp_img: str = PP_CLIP) -> dict:
  """The CLIP paper's full-data logistic-regression probes (mmcl/evaluate/linear_probe.py)."""
  return {f'linear_probe_{d}': dict(type='linear_probe', every=every, dataset=d,
                                    batch_size=batch_size, pp_img=pp_img) for d in datasets}


def zeroshot_suite(datasets=None, prompts: str | None = None, every: int = 0,
                   batch_size: int = 256, pp_img: str = PP_CLIP, lowercase: bool = False,
                   strip_punctuation: bool = False) -> dict:
  """CLIP's / DataComp's zero-shot classification suite (mmcl/evaluate/suite.py; default its
  DataComp datasets) as one evaluator, with `zeroshot/suite/mean` (DataComp's summary).

  Each dataset keeps its own names, templates and metric; prompts='classname' (say) replaces
  every dataset's templates (a cheap smoke test). docs/evaluation.md lists the protocols.
  """
  from mmcl.evaluate import suite  # Lazy: configs stay importable without TensorFlow.
  return {'zeroshot_suite': dict(
      type='zeroshot', every=every, datasets=suite.entries(datasets, prompts),
      summary='suite', batch_size=batch_size, pp_img=pp_img, lowercase=lowercase,
      strip_punctuation=strip_punctuation)}


# Suites `tools/eval.py --evals=NAME` adds to a config that has no eval of that name.
NAMED_SUITES = {'suite': zeroshot_suite, 'imagenet': imagenet_suite,
                'retrieval': retrieval_suite}


def with_named_suites(config, names):
  """(config, names of config.evals to run) for `--evals`: a name that is not in config.evals
  but is in NAMED_SUITES adds that suite (and stands for its evaluators)."""
  if not names:
    return config, names
  config, only = config.copy_and_resolve_references(), []
  for name in names:
    if name in config.evals or name not in NAMED_SUITES:
      only.append(name)  # Unknown names are reported by the caller, with the valid ones.
      continue
    added = NAMED_SUITES[name]()
    config.evals.update(added)
    only += list(added)
  return config, only
