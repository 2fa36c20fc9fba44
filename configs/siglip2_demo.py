r"""SigLIP 2's decoder objectives on the synthetic `mmcl_shapes` data, on a 2-core CPU.

The SigLIP demo (configs/demo.py:siglip) plus a LocCa decoder over the image tower's tokens:
captioning, referring expressions (region caption -> box tokens) and grounded captioning
(box -> region caption), one task per example. It reports zero-shot shape/colour, the
decoder's caption exact match and token accuracy, referring-expression accuracy (IoU >= 0.5),
grounded-captioning accuracy, and prints greedy outputs for a few test images:

  python tools/train.py --config configs/siglip2_demo.py --workdir /tmp/mmcl_siglip2
  python tools/train.py --config configs/siglip2_demo.py:nodecoder --workdir /tmp/w  # ablation
  python tools/train.py --config configs/siglip2_demo.py:cappa --workdir /tmp/w
  python tools/train.py --config configs/siglip2_demo.py:distill --workdir /tmp/w  # + SILC/TIPS

Options (comma-separated): 'locca' (default: SigLIP 2's sigmoid + LocCa, 75% of its examples
read by CapPa's parallel prediction, which raised zero-shot here), 'coca' (softmax
contrastive + captioning, open_clip's CoCa weights), 'cappa' (captioning alone, CapPa's
parallel prediction), 'nodecoder' (the decoder off: the SigLIP baseline), 'distill' (adds
the EMA teacher's self-distillation and masked prediction for the last 20% of steps, as
configs/demo.py:siglip,distill; opt-in because on the CPU those steps cost ~2x), 'tiny'
(seconds; tests). docs/siglip2.md explains each setting.
"""
import ml_collections

from configs import common, demo

OBJECTIVES = ('locca', 'coca', 'cappa', 'nodecoder')
OPTIONS = OBJECTIVES + ('distill', 'tiny')
NUM_BINS = 32  # Coordinate tokens per axis: 2 px bins on 64 px images.
BYTES_VOCAB = 258  # mmcl.data.tokenizers.ByteTokenizer.vocab_size (config.tokenizer='bytes').


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  options = common.parse_options(arg, OPTIONS, 'siglip2_demo')
  objectives = options & set(OBJECTIVES)
  if len(objectives) > 1:
    raise ValueError(f'Bad siglip2_demo options {arg!r}: at most one of {OBJECTIVES}.')
  objective = objectives.pop() if objectives else 'locca'
  tiny = 'tiny' in options
  c = demo.get_config(','.join(['clip' if objective == 'coca' else 'siglip'] +
                               (['tiny'] if tiny else [])))
  c.contrastive_weight = 1.0  # 0: a captioning-only run (cappa).
  if objective == 'nodecoder':
    return demo.add_self_distill(c, tiny) if 'distill' in options else c

  tasks = ('cap', 'aref', 'gcap') if objective == 'locca' else ('cap',)
  c.decoder_len = 32 if tiny else 64  # Longest single-object caption: 59 bytes + 'cap:'.
  c.model.decoder = ml_collections.ConfigDict(dict(
      # SigLIP 2 (sec. 2.2, our reading): the decoder has the text tower's shape with half
      # its layers; the demo's text tower has one layer, so one here too.
      variant='pico', depth=1, vocab_size=BYTES_VOCAB + NUM_BINS,
      max_len=c.get_ref('decoder_len'), tie_embedding=False, dropout=0.0,
      # CapPa's parallel prediction for 75% of examples (big_vision proj/cappa
      # masked_pred_prob=0.75), for LocCa too: over four seeds it raised zero-shot shape,
      # colour and held-out pairs here, where autoregressive LocCa did not
      # (docs/siglip2.md; --config.model.decoder.parallel_prob=0 is LocCa's reading).
      # CoCa reads captions autoregressively, as open_clip's.
      parallel_prob=0.0 if objective == 'coca' else 0.75,
      # open_clip CoCa: caption_loss_weight=2.0 beside clip_loss_weight=1.0.
      loss_weight=2.0 if objective == 'coca' else 1.0))
  if objective == 'cappa':
    c.contrastive_weight = 0.0
  c.input.pp = ('decode|value_range(-1, 1)|choice(inkey="captions", outkey="texts")|'
                'tokenize(max_len={text_len}, tokenizer="{tokenizer}", inkey="texts", '
                'outkey="text")|'
                f'decoder_tasks(max_len={c.decoder_len}, tokenizer="{{tokenizer}}", tasks={tasks}, '
                f'num_bins={NUM_BINS})|keep("image", "text", "dec_tokens", "dec_loss_mask")')
  c.evals.captioning = dict(
      type='captioning', every=0, dataset=c.input.name, split='test' if tiny else 'test[:512]',
      pp_img='decode|value_range(-1, 1)', tasks=tasks, num_bins=NUM_BINS, batch_size=256,
      beam=1, show=4)
  if 'distill' in options:  # After the pp string is final: it adds the views to it.
    demo.add_self_distill(c, tiny)
  return c
