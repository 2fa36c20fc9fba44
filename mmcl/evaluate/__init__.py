"""Evaluators built from `config.evals`: each returns a flat dict of metrics.

`config.evals.<name>` = {type, every (steps; 0 = only at the end), **kwargs}. The kwargs
`tokenizer`, `text_len` and `data_dir` default to the top-level config's; `pp_img` strings
(also those of zero-shot `datasets` entries) get `{image_size}` etc. filled from it.
Types: zeroshot, retrieval, probe, linear_probe, geometry (see docs/evaluation.md), captioning
(docs/siglip2.md); sugarcrepe, aro, winoground, xm3600, karpathy_retrieval (from their
released files).
"""
from mmcl.data import input_pipeline
from mmcl.evaluate.captioning import CaptioningEvaluator
from mmcl.evaluate.geometry import GeometryEvaluator
from mmcl.evaluate.linear_probe import LinearProbeEvaluator
from mmcl.evaluate.predict import Predictor
from mmcl.evaluate.probe import ProbeEvaluator
from mmcl.evaluate.retrieval import RetrievalEvaluator
from mmcl.evaluate.zeroshot import ZeroShotEvaluator

EVALUATORS = {'zeroshot': ZeroShotEvaluator, 'retrieval': RetrievalEvaluator,
              'probe': ProbeEvaluator, 'geometry': GeometryEvaluator,
              'captioning': CaptioningEvaluator, 'linear_probe': LinearProbeEvaluator}

# Benchmarks read from their released files in a local directory (docs/evaluation.md).
from mmcl.evaluate import aro, karpathy, sugarcrepe, winoground, xm3600  # noqa: E402
EVALUATORS.update(sugarcrepe=sugarcrepe.SugarCrepeEvaluator, aro=aro.AroEvaluator,
                  winoground=winoground.WinogroundEvaluator, xm3600=xm3600.XM3600Evaluator,
                  karpathy_retrieval=karpathy.KarpathyRetrievalEvaluator)


def check_types(evals_config):
  for name, cfg in evals_config.items():
    if cfg.get('type') not in EVALUATORS:
      raise ValueError(f'Unknown evaluator type {cfg.get("type")!r} in config.evals.{name}; '
                       f'valid: {sorted(EVALUATORS)}')


def build_evaluators(config, predictor: Predictor) -> dict:
  """{name: (evaluator, every)} from `config.evals`."""
  check_types(config.evals)
  out = {}
  for name, cfg in config.evals.items():
    kwargs = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
    kind, every = kwargs.pop('type'), kwargs.pop('every', 0)
    kwargs.setdefault('tokenizer', config.tokenizer)
    kwargs.setdefault('text_len', config.text_len)
    kwargs.setdefault('data_dir', config.get('data_dir'))
    if 'pp_img' in kwargs:
      kwargs['pp_img'] = input_pipeline.format_pp(kwargs['pp_img'], config)
    if kwargs.get('datasets'):
      kwargs['datasets'] = [
          {**d, 'pp_img': input_pipeline.format_pp(d['pp_img'], config)}
          if hasattr(d, 'keys') and d.get('pp_img') else d for d in kwargs['datasets']]
    try:
      out[name] = (EVALUATORS[kind](predictor, **kwargs), every)
    except TypeError as e:  # An unknown or missing knob: name the evaluator it belongs to.
      raise TypeError(f'config.evals.{name} (type {kind!r}): {e}') from e
  return out
