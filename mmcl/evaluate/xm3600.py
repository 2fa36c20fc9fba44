"""Crossmodal-3600 (Thapliyal et al., EMNLP 2022): multilingual image-text retrieval.

Released at google.github.io/crossmodal-3600: captions.jsonl, one line per image
{"image/key": ..., "<lang>": {"caption": [...], ...}, ...} for 36 languages, and
images.tgz holding images/<key>.jpg (3,600 images). For each language, retrieval over all
images and all of that language's captions, with the protocol of retrieval.py: an image is a
hit at K if any of its captions is among its K best captions, a caption if its image is among
its K best images. Images without a caption in a language are candidates for that language's
text->image queries but not image->text queries. Metrics
`retrieval/xm3600/<lang>/{i2t,t2i}_r{1,5,10}` (and mean/median ranks) and their mean over the
evaluated languages, `retrieval/xm3600/avg/...`.

Texts are tokenized with the config's tokenizer: for 36 languages a multilingual
SentencePiece model, `tokenizer='sp:/path/to/model.model'` (e.g. SigLIP's multilingual one).
"""
from collections.abc import Sequence

import numpy as np

from mmcl import fs
from mmcl.evaluate import local_files
from mmcl.evaluate import retrieval
from mmcl.evaluate.predict import Predictor

LANGUAGES = ('ar', 'bn', 'cs', 'da', 'de', 'el', 'en', 'es', 'fa', 'fi', 'fil', 'fr', 'he',
             'hi', 'hr', 'hu', 'id', 'it', 'ja', 'ko', 'mi', 'nl', 'no', 'pl', 'pt', 'quz',
             'ro', 'ru', 'sv', 'sw', 'te', 'th', 'tr', 'uk', 'vi', 'zh')


class XM3600Evaluator(local_files.LocalBenchmark):
  """Image<->text R@1/5/10 per language; `root` holds captions.jsonl and images/<key>.jpg."""

  def __init__(self, predictor: Predictor, *, root: str,
               languages: Sequence[str] | None = None, image_ext: str = 'jpg',
               chunk: int = 1024, **kw):
    super().__init__(predictor, **kw)
    languages = [languages] if isinstance(languages, str) else languages
    self.languages = tuple(languages or LANGUAGES)
    unknown = [l for l in self.languages if l not in LANGUAGES]
    if unknown:
      raise ValueError(f'Unknown XM3600 languages {unknown}; valid: {list(LANGUAGES)}.')
    self.chunk = chunk
    lines = local_files.read_jsonl(fs.join(root, 'captions.jsonl'), 'XM3600')
    if not lines:
      raise ValueError(f'XM3600: {root}/captions.jsonl holds no images.')
    for i, line in enumerate(lines):
      local_files.require(line, ('image/key',), 'XM3600 captions.jsonl', f'on line {i + 1}')
    self.paths = [fs.join(root, 'images', f'{line["image/key"]}.{image_ext}') for line in lines]
    self.captions = {}  # lang -> (texts, image index of each).
    for lang in self.languages:
      texts, image_of_text = [], []
      for i, line in enumerate(lines):
        caps = line.get(lang, {}).get('caption', [])
        texts += list(caps)
        image_of_text += [i] * len(caps)
      if not texts:
        raise ValueError(f'XM3600: no {lang!r} captions in {root}/captions.jsonl.')
      self.captions[lang] = (texts, np.asarray(image_of_text, np.int64))

  def run(self, params) -> dict[str, float]:
    zimg, img_row = self.embed_images(params, self.paths)
    zimg = zimg[img_row]
    metrics, per_lang = {}, []
    for lang, (texts, image_of_text) in self.captions.items():
      ztxt, txt_row = self.embed_texts(params, texts)
      i2t, t2i = retrieval.retrieval_ranks(zimg, ztxt[txt_row], image_of_text, self.chunk)
      has_caption = np.isin(np.arange(len(zimg)), image_of_text)
      m = retrieval.retrieval_metrics(i2t[has_caption], t2i, f'retrieval/xm3600/{lang}')
      metrics.update(m)
      per_lang.append({k.rsplit('/', 1)[1]: v for k, v in m.items()})
    for k in per_lang[0]:
      metrics[f'retrieval/xm3600/avg/{k}'] = float(np.mean([m[k] for m in per_lang]))
    return metrics
