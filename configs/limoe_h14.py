r"""LIMoE-H/14: the paper's largest model, 32 experts every 2 layers, batch 16,384 for
781,250 steps at resolution 224 (shared/PAPERS.md); see configs/limoe_b16.py for the rest.
Target: v4:8x8x8 (512 chips, megacore). Fit (tools/compile.py, BENCHMARKS.md section 5):
experts over 8 chips, FSDP of the other weights and Adam state over 4, and remat: 17.60 of
32 GiB per chip (45% spare).

  python tools/compile.py --config configs/limoe_h14.py --topology v4:8x8x8

  python tools/train.py --config configs/limoe_h14.py --workdir gs://bucket/limoe_h14 \
      --config.input.name=<tfds image-text dataset> --config.data_dir=<tfds data_dir> \
      --config.tokenizer=sp:/path/to/32k.model
  python tools/model_summary.py --config configs/limoe_h14.py
  python tools/train.py --config configs/limoe_h14.py:tiny --workdir /tmp/limoe_h14_tiny
"""
import ml_collections

from configs import limoe_b16

OPTIONS = limoe_b16.OPTIONS


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  # Experts over 8 devices, other weights and Adam state FSDP over 4: a multiple of 32 chips.
  return limoe_b16.recipe(arg, variant='H/14', res=224, batch_size=16_384, steps=781_250,
                          mesh=(('data', -1), ('fsdp', 4), ('expert', 8)), remat=True)
