"""The zero-shot suite: the classification datasets of CLIP's / DataComp's benchmark that TFDS
(4.9) has a builder for, each with the protocol CLIP_benchmark runs (split, label, names,
templates, metric), and its DataComp-style summary `zeroshot/suite/mean`.

Each entry is a `datasets` entry of the zero-shot evaluator (mmcl/evaluate/zeroshot.py) keyed
by its metric name. Splits: VTAB's (google-research/task_adaptation) where CLIP_benchmark and
DataComp use its `vtab/` version (caltech101, cifar, clevr, dtd, eurosat, flowers, kitti,
pets, pcam, resisc45, svhn), else the dataset's official test set. `metric` is top-1
accuracy, or mean per-class recall for the four datasets the CLIP paper (Table 9) and
DataComp score that way (aircraft, which TFDS lacks, pets, caltech101, flowers).

Not here, because TFDS has no builder: FGVC-Aircraft, GTSRB, Country211, Rendered SST2,
ObjectNet, ImageNet-O, FER2013, and DataComp's WILDS, fairness and retrieval tasks. VOC 2007
is in TFDS, but CLIP_benchmark classifies crops of its boxes, which is not implemented.
`VTAB_EXTRA` holds the VTAB tasks CLIP_benchmark has and DataComp does not.
"""

# The ImageNet variants score against ImageNet-1k's 1,000 rows (-A/-R: their 200 of them).
_IN = dict(split='test', classnames='imagenet', prompts='clip80', metric='top1')
_MPCR = 'mean_per_class_recall'


def _e(dataset, classnames, prompts, split='test', metric='top1', label_key='label', **kw):
  return dict(dataset=dataset, split=split, label_key=label_key, classnames=classnames,
              prompts=prompts, metric=metric, **kw)


DATACOMP = {
    'imagenet2012': dict(_IN, dataset='imagenet2012', split='validation', label_key='label'),
    'imagenet_v2': dict(_IN, dataset='imagenet_v2', label_key='label'),
    'imagenet_sketch': dict(_IN, dataset='imagenet_sketch', label_key='label'),
    'imagenet_a': dict(_IN, dataset='imagenet_a', label_key='label', class_subset='imagenet_a'),
    'imagenet_r': dict(_IN, dataset='imagenet_r', label_key='label', class_subset='imagenet_r'),
    'caltech101': _e('caltech101', 'caltech101', 'clip_caltech101', metric=_MPCR),
    'cars196': _e('cars196', 'cars196', 'clip_cars'),
    'cifar10': _e('cifar10', 'cifar10', 'clip_cifar'),
    'cifar100': _e('cifar100', 'cifar100', 'clip_cifar'),
    # CLEVR's test split has no scenes: VTAB tests on its validation split.
    'clevr_count_all': _e('clevr', 'clevr_count', 'clip_clevr_count', split='validation',
                          pp_label='clevr_count_label'),
    'clevr_closest_object_distance': _e('clevr', 'clevr_distance', 'clip_clevr_distance',
                                        split='validation', pp_label='clevr_distance_label'),
    'dtd': _e('dtd', 'dtd', 'clip_dtd'),
    # EuroSAT and RESISC45 have one TFDS split; VTAB's test is its last 20%.
    'eurosat': _e('eurosat/rgb', 'eurosat', 'clip_eurosat', split='train[80%:]'),
    # TFDS calls Food-101's official 25,250-image test set 'validation'.
    'food101': _e('food101', 'food101', 'clip_food101', split='validation'),
    'kitti_closest_vehicle_distance': _e('kitti', 'kitti_distance', 'clip_kitti_distance',
                                         pp_label='kitti_distance_label'),
    'mnist': _e('mnist', 'mnist', 'clip_mnist'),
    'oxford_flowers102': _e('oxford_flowers102', 'oxford_flowers102', 'clip_flowers',
                            metric=_MPCR),
    'oxford_iiit_pet': _e('oxford_iiit_pet', 'oxford_iiit_pet', 'clip_pets', metric=_MPCR),
    'patch_camelyon': _e('patch_camelyon', 'patch_camelyon', 'clip_pcam'),
    'resisc45': _e('resisc45', 'resisc45', 'clip_resisc45', split='train[80%:]'),
    'stl10': _e('stl10', 'stl10', 'clip_stl10'),
    'sun397': _e('sun397/tfds', 'sun397', 'clip_sun397'),
    'svhn_cropped': _e('svhn_cropped', 'svhn', 'clip_svhn'),
}

VTAB_EXTRA = {
    'diabetic_retinopathy': _e('diabetic_retinopathy_detection/btgraham-300',
                               'diabetic_retinopathy', 'clip_diabetic_retinopathy'),
    'dmlab': _e('dmlab', 'dmlab', 'clip_dmlab'),
    # VTAB: validation on the first half of smallNORB's test split, test on the second.
    'smallnorb_label_azimuth': _e('smallnorb', 'smallnorb_azimuth', 'clip_smallnorb',
                                  split='test[50%:]', label_key='label_azimuth'),
    'smallnorb_label_elevation': _e('smallnorb', 'smallnorb_elevation', 'clip_smallnorb',
                                    split='test[50%:]', label_key='label_elevation'),
}

SUITE = {**DATACOMP, **VTAB_EXTRA}


def entries(names=None, prompts=None) -> list[dict]:
  """`datasets` entries (each with its metric `name`) of the suite datasets `names`
  (default: DataComp's); `prompts` replaces every entry's templates."""
  names = list(DATACOMP) if names is None else list(names)
  unknown = [n for n in names if n not in SUITE]
  if unknown:
    raise ValueError(f'Unknown zero-shot suite datasets {unknown}; valid: {sorted(SUITE)}.')
  return [dict(SUITE[n], name=n, **({'prompts': prompts} if prompts else {})) for n in names]
