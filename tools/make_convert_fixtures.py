r"""Writes the open_clip parity fixtures of tests/test_convert.py under tests/data/.

Needs torch and open_clip (not mmcl dependencies; the tests themselves need neither):

  pip install torch --index-url https://download.pytorch.org/whl/cpu open_clip_torch ftfy
  python tools/make_convert_fixtures.py            # rewrites tests/data/open_clip_*

For each model in MODELS, a small randomly initialised open_clip model (seed 0; every
parameter then gets N(0, 0.02) noise so biases and LayerNorms are not their trivial inits):
  open_clip_<name>.safetensors  its state_dict, float32
  open_clip_<name>.json         the open_clip model config it was built from (as a user has it)
  open_clip_<name>_io.npz       fixed inputs and open_clip's outputs: image [B,3,H,W] (NCHW),
                                text [B,L] int, image_features / text_features (encode_image /
                                encode_text, unnormalised), logit_scale[, logit_bias]
The models: 'vit_quickgelu' (OpenAI CLIP layout: ln_pre, quick_gelu, class-token pooling,
causal text pooled at the argmax = EOT id, bias-free projections) and 'siglip_style'
(open_clip's CustomTextCLIP: no ln_pre, average pooling, exact GELU image / tanh GELU text,
LayerNorm eps 1e-6, bidirectional text pooled at the last token, projection bias, logit_bias,
head width 16).

Also the CLIP BPE tokenizer fixture: a hand-made merges file `clip_bpe_tiny.txt.gz` (open_clip's
bpe_simple_vocab_16e6.txt.gz format) and `clip_bpe_tiny_ids.npz`, open_clip's SimpleTokenizer ids
for TEXTS with it.

And it checks mmcl's export here, where torch is: the mmcl import of each model, exported back,
loads into open_clip (strict) and gives the same features.
"""
import gzip
import json
import os
import sys

import numpy as np
import open_clip
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from mmcl.convert import io as io_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from mmcl.convert import open_clip as convert  # pylint: disable=g-import-not-at-top,wrong-import-position

OUT = os.path.join(os.path.dirname(__file__), '..', 'tests', 'data')
VOCAB = 512
MODELS = {
    'vit_quickgelu': dict(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
        text_cfg=dict(context_length=16, vocab_size=VOCAB, width=64, heads=1, layers=2)),
    'siglip_style': dict(
        embed_dim=32, custom_text=True, init_logit_bias=-10.0,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16,
                        pool_type='avg', no_ln_pre=True, norm_kwargs={'eps': 1e-6}),
        text_cfg=dict(context_length=16, vocab_size=VOCAB, width=64, heads=4, layers=2,
                      mlp_ratio=3.0, no_causal_mask=True, proj_bias=True, pool_type='last',
                      norm_kwargs={'eps': 1e-6}, act_kwargs={'approximate': 'tanh'})),
}
MERGES = ['t h', 'th e</w>', 'c a', 'ca t</w>', 'd o', 'do g</w>', 'a </w>', 'o f</w>',
          'p h', 'ph o', 'pho t', 'phot o</w>', 'i n', 'in g</w>', 'e r', 'er </w>']
TEXTS = ['a photo of the cat', 'A   Dog&amp;a  CAT!! ', 'photographing 3 dogs, 12 cats.',
         "it's the cat's toy", '']


def _texts(rng, b, l):
  """Rows like a tokenizer's: SOT ... EOT then pads (EOT = the largest id, as in CLIP)."""
  text = np.zeros([b, l], np.int64)
  for i in range(b):
    n = l if i == 0 else int(rng.integers(1, l - 1))  # One full row, others padded.
    text[i, :n] = rng.integers(1, VOCAB - 2, n)
    text[i, 0], text[i, n - 1] = VOCAB - 2, VOCAB - 1
  return text


def make_model(name, cfg):
  torch.manual_seed(0)
  kw = {k: v for k, v in cfg.items() if k != 'custom_text'}
  model = (open_clip.CustomTextCLIP if cfg.get('custom_text') else open_clip.CLIP)(**kw).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  rng = np.random.default_rng(0)
  s, l = cfg['vision_cfg']['image_size'], cfg['text_cfg']['context_length']
  image = rng.standard_normal([3, 3, s, s]).astype(np.float32)
  text = _texts(rng, 3, l)
  with torch.no_grad():
    fimg = model.encode_image(torch.from_numpy(image)).numpy()
    ftxt = model.encode_text(torch.from_numpy(text)).numpy()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  io_lib.save_safetensors(os.path.join(OUT, f'open_clip_{name}.safetensors'), sd)
  with open(os.path.join(OUT, f'open_clip_{name}.json'), 'w') as f:
    json.dump(cfg, f, indent=2)
  extra = {'logit_bias': sd['logit_bias']} if 'logit_bias' in sd else {}
  np.savez(os.path.join(OUT, f'open_clip_{name}_io.npz'), image=image, text=text,
           image_features=fimg, text_features=ftxt, logit_scale=sd['logit_scale'], **extra)

  # mmcl import -> export -> open_clip: strict load, same features.
  imp = convert.import_open_clip(os.path.join(OUT, f'open_clip_{name}.safetensors'), cfg)
  sd2, cfg2 = convert.export_open_clip(imp.model_config, imp.params)
  back = open_clip.CLIP(**cfg2).eval()
  back.load_state_dict({k: torch.from_numpy(v) for k, v in sd2.items()}, strict=True)
  with torch.no_grad():
    err = max(np.abs(back.encode_image(torch.from_numpy(image)).numpy() - fimg).max(),
              np.abs(back.encode_text(torch.from_numpy(text)).numpy() - ftxt).max())
  print(f'{name}: {len(sd)} tensors; mmcl export reloaded in open_clip, max diff {err:.2e}')
  assert err < 1e-5, err


def make_tokenizer_fixture():
  from open_clip.tokenizer import SimpleTokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(OUT, 'clip_bpe_tiny.txt.gz')
  with gzip.GzipFile(path, 'wb', mtime=0) as f:  # mtime=0: same bytes on every run.
    f.write(('#version: 0.2 (mmcl test fixture)\n' + '\n'.join(MERGES) + '\n').encode())
  tok = SimpleTokenizer(bpe_path=path, context_length=12)
  ids = tok(TEXTS).numpy()
  np.savez(os.path.join(OUT, 'clip_bpe_tiny_ids.npz'), texts=np.array(TEXTS), ids=ids)
  print('tokenizer:', ids.tolist())


if __name__ == '__main__':
  os.makedirs(OUT, exist_ok=True)
  for model_name, model_cfg in MODELS.items():
    make_model(model_name, model_cfg)
  make_tokenizer_fixture()
