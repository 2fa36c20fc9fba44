r"""Pretrained weights in and out of mmcl (see docs/pretrained.md).

  # open_clip / OpenAI CLIP ViT -> mmcl: writes OUT.npz (params) and OUT.json (model config,
  # image_size, text_len); --open_clip_config is optional (shapes give the rest).
  python tools/convert.py import --source open_clip --weights ViT-B-32.safetensors \
      --open_clip_config ViT-B-32-quickgelu.json --out /tmp/vitb32
  # ... --fold_normalize: the model then takes value_range(0, 1) pixels (CLIP mean/std folded in)
  python tools/convert.py import --source open_clip --weights openai_b32.bin --quick_gelu --out ...
  # big_vision SigLIP .npz -> mmcl
  python tools/convert.py import --source big_vision --weights webli_en_b16_224.npz --out /tmp/siglip
  # ... at another resolution: the position embedding resampled to the 384 px grid
  python tools/convert.py import --source big_vision --weights webli_en_b16_224.npz \
      --image_size 384 --out /tmp/siglip384
  # mmcl -> open_clip: OUT.safetensors + OUT.json (open_clip's model config format)
  python tools/convert.py export --params /tmp/vitb32.npz --model_json /tmp/vitb32.json --out /tmp/oc
  # a demo trained with --config.model.image.pool=tok (open_clip ViTs have a class token)
  python tools/convert.py export --params WORKDIR/ckpt/2000 --config configs/demo.py \
      --config.model.image.pool=tok --eos_id 1 --out /tmp/demo_oc
"""
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

flags.DEFINE_enum('source', 'open_clip', ['open_clip', 'big_vision'], 'import: weight format.')
flags.DEFINE_string('weights', None, 'import: .safetensors / .pt / .bin (open_clip) or .npz.')
flags.DEFINE_string('open_clip_config', None, 'import: open_clip model config JSON (optional).')
flags.DEFINE_bool('quick_gelu', None, "import: OpenAI's original weights use QuickGELU.")
flags.DEFINE_integer('head_width', 64, 'import: open_clip attention head width if not given.')
flags.DEFINE_string('text_pool', 'last', "import big_vision: text pooling ('last', 'first', ...).")
flags.DEFINE_bool('fold_normalize', False, "import open_clip: fold OpenAI CLIP's pixel mean/std "
                  'into the patch embedding, so the model takes value_range(0, 1) images.')
flags.DEFINE_integer('sticky_eos', 1, 'import big_vision: pads are embedded as this id (SigLIP '
                     'pads with EOS = 1); -1: off.')
flags.DEFINE_integer('image_size', None, 'import: resample the position embedding for this '
                     'image size (another resolution than the checkpoint\'s).')
flags.DEFINE_enum('resample', 'bilinear', ['bilinear', 'bicubic'], 'import: how (--image_size).')
flags.DEFINE_string('params', None, 'export: params .npz (from import) or <workdir>/ckpt/<step>.')
flags.DEFINE_string('model_json', None, 'export: the .json written by import.')
config_flags.DEFINE_config_file('config', None, 'export: an mmcl config (its .model is used).',
                                lock_config=False)
flags.DEFINE_integer('eos_id', None, "export: tokenizer EOS id, for text pool 'eot'.")
flags.DEFINE_string('out', None, 'Output path without extension.')
flags.mark_flags_as_required(['out'])


def main(argv):
  from mmcl import fs, tree  # pylint: disable=g-import-not-at-top
  from mmcl.convert import big_vision, io, open_clip  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  command = argv[1] if len(argv) == 2 else None
  if command == 'import':
    if not f.weights:
      raise app.UsageError('import needs --weights.')
    if f.source == 'open_clip':
      imp = open_clip.import_open_clip(f.weights, f.open_clip_config, head_width=f.head_width,
                                       quick_gelu=f.quick_gelu, resize_to=f.image_size,
                                       resample=f.resample)
      size, length = open_clip.image_size(imp.open_clip_config), imp.model_config['text']['max_len']
    else:
      imp = big_vision.import_big_vision(f.weights, text_pool=f.text_pool,
                                         sticky_eos=None if f.sticky_eos < 0 else f.sticky_eos,
                                         resize_to=f.image_size, resample=f.resample)
      size, length = imp.image_size, imp.context_length
    meta = dict(model=imp.model_config, image_size=size, text_len=length)
    params = imp.params
    if f.fold_normalize:  # Recorded, so that export unfolds it again.
      params = open_clip.fold_normalization(params)
      meta['folded_normalization'] = dict(mean=open_clip.OPENAI_MEAN, std=open_clip.OPENAI_STD)
    io.save_params(f.out + '.npz', params)
    with fs.open(f.out + '.json', 'w') as fp:  # --out may be gs://...
      json.dump(meta, fp, indent=2)
    n = sum(v.size for v in tree.flatten(imp.params).values())
    print(f'{f.weights} -> {f.out}.npz ({n:,} parameters), {f.out}.json')
  elif command == 'export':
    if not f.params or bool(f.model_json) == bool(f.config):
      raise app.UsageError('export needs --params and one of --model_json / --config.')
    params, fold = io.load_params(f.params), None
    if f.model_json:
      with fs.open(f.model_json) as fp:
        meta = json.load(fp)
      model_cfg, fold = meta['model'], meta.get('folded_normalization')
    else:
      model_cfg = f.config.model.to_dict()
    if fold:
      params = open_clip.fold_normalization(params, fold['mean'], fold['std'], unfold=True)
    open_clip.export_open_clip(model_cfg, params, f.out, eos_id=f.eos_id)
    print(f'{f.params} -> {f.out}.safetensors, {f.out}.json (open_clip)')
  else:
    raise app.UsageError('usage: convert.py import|export --out PATH ...')


if __name__ == '__main__':
  app.run(main)
