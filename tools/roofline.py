r"""Analytic per-chip lower bounds of paper-scale train steps on TPU slices (shapes only).

  python tools/roofline.py --slices v4:256,v5e:256 --batch 32768

One JSON line per (slice, model) for B/16, L/14 and LIMoE-B/16: compute at the chip's bf16
peak, HBM traffic, collectives (BENCHMARKS.md section 5b). The TPU compiler's own figures for
the recipes come from tools/compile.py; this is the estimate they replaced.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list('slices', ['v4:256', 'v5e:256'], 'CHIP:N slices (N chips).')
flags.DEFINE_integer('batch', 32_768, 'Global batch.')


def paper_models() -> dict:
  """(model config, image size, text length, expert-axis size) of the roofline's models."""
  import ml_collections
  from configs import limoe_b16

  def clip(image, text, embed, text_width):  # CLIP's recipes: 224 px, 77 tokens, 49,408 words.
    return ml_collections.ConfigDict(dict(
        name='two_towers', embed_dim=embed, dtype='bfloat16',
        image=dict(variant=image, pool='tok'),
        text=dict(variant=text, width=text_width, style='clip', vocab_size=49_408, max_len=77)))
  limoe = limoe_b16.get_config()
  return {'B/16': (clip('B/16', 'M', 512, None), 224, 77, 1),
          'L/14': (clip('L/14', 'B', 768, None), 224, 77, 1),
          'LIMoE-B/16': (limoe.model, 224, limoe.text_len, dict(limoe.mesh)['expert'])}


def roofline(name, model, image_size: int, text_len: int, batch: int, chip: str,
             chips: int, experts_axis: int = 1) -> dict:
  """Lower bounds on one data-parallel train step per chip (bf16 compute, fp32 params and
  AdamW state, no remat): compute at peak, HBM traffic, collectives; see BENCHMARKS.md."""
  from mmcl.models import flops as flops_lib
  from mmcl.models import moe as moe_lib
  from mmcl.models import text as text_lib
  from mmcl.models import vit
  from mmcl.parallel import topology
  c = topology.CHIPS[chip]  # The one table of chip peaks, with its sources.
  hw = dict(peak=c.peak_flops, hbm_bw=c.hbm_bw, hbm=c.hbm_bytes, ici=c.ici_bw)
  local = batch / chips
  f = flops_lib.train_step_flops(model, image_size, text_len, global_batch=batch,
                                 local_batch=int(local))
  params = flops_lib.param_count(model, image_size, text_len)
  m = model.to_dict()
  towers = ([(m, (image_size // vit.resolve_hparams(m['variant'])['patch_size'])**2),
             (m, text_len)] if m['name'] == 'limoe' else
            [(m['image'], (image_size // vit.resolve_hparams(
                m['image']['variant'])['patch_size'])**2 + 1), (m['text'], text_len)])
  act_bytes, a2a_bytes, expert_params = 0.0, 0.0, 0
  for tower, tokens in towers:
    variant = tower.get('variant') and tower['variant'].split('/')[0]  # Patch not needed.
    hp = text_lib.resolve_hparams(variant, tower.get('width'), tower.get('depth'),
                                  tower.get('mlp_dim'), tower.get('num_heads'))
    d, ff, h = hp['width'], hp['mlp_dim'], hp['num_heads']
    # Activations: ~(8D + 2F + 2HL) bf16 values per token and layer, written in the forward
    # pass, read and their gradients written in the backward pass (3 passes).
    act_bytes += 3 * 2 * local * tokens * hp['depth'] * (8 * d + 2 * ff + 2 * h * tokens)
    if tower.get('moe'):  # Dispatch + return, forward and backward: 4 all-to-alls of the
      spec = moe_lib.MoeSpec.make(tower['moe'])  # bf16 [tokens x cf x k, D] buffer a layer.
      layers = len(spec.layer_ids(hp['depth']))
      a2a_bytes += 4 * layers * local * tokens * spec.capacity_factor * spec.k * d * 2
      expert_params = layers * spec.num_experts * 2 * d * (spec.mlp_dim or ff)
  # Expert weights are split over the expert axis: each chip all-reduces 1/E_axis of them.
  grad_bytes = 4 * (params - expert_params + expert_params / experts_axis)
  state_bytes = 16 * (params - expert_params + expert_params / experts_axis)  # p, g, mu, nu.
  hbm_bytes = 2 * state_bytes + act_bytes  # Optimizer: read and write each once.
  embed = m['embed_dim']
  gather_bytes = 2 * batch * embed * 4  # Both embeddings, gathered (fp32), and the backward
  n = chips  # reduce-scatter of the same size; the gradient all-reduce in a ring:
  comm_bytes = 2 * (n - 1) / n * grad_bytes + 2 * (n - 1) / n * gather_bytes + a2a_bytes
  t = {'compute': f['train'] * local / hw['peak'], 'hbm': hbm_bytes / hw['hbm_bw'],
       'comm': comm_bytes / hw['ici']}
  bound = max(t, key=t.get)
  return dict(model=name, chip=chip, chips=chips, global_batch=batch, params=params,
              train_gflops_per_example=round(f['train'] / 1e9, 2),
              tflops_per_chip_step=round(f['train'] * local / 1e12, 2),
              hbm_gb_per_chip_step=round(hbm_bytes / 1e9, 2),
              grad_allreduce_mb=round(grad_bytes / 1e6, 1),
              embedding_gather_mb=round(gather_bytes / 1e6, 1),
              all_to_all_mb=round(a2a_bytes / 1e6, 1),
              **{f'{k}_ms': round(1e3 * v, 1) for k, v in t.items()}, bound=bound,
              examples_per_sec_per_chip=round(local / t[bound], 1),
              fits_hbm=bool(state_bytes + act_bytes / 3 < hw['hbm']))


def main(argv):
  del argv
  f = flags.FLAGS
  for slice_ in f.slices:
    chip, chips = slice_.split(':')
    for name, (model, size, length, experts) in paper_models().items():
      print(json.dumps(roofline(name, model, size, length, f.batch, chip, int(chips),
                                experts)), flush=True)


if __name__ == '__main__':
  app.run(main)
