r"""Train-step throughput of a config: one JSON line of measured and analytic figures.

  python tools/bench_step.py --config configs/bench_small.py --reference open_clip
  python tools/bench_step.py --config configs/demo.py --batch 256 --steps 5
  python tools/bench_step.py --config configs/demo.py:tiny --devices 8 --collectives
  python tools/bench_step.py --roofline v4:256,v5e:256 --batch 32768
  python tools/bench_step.py --config configs/demo.py --patch_dropout 0,0.5,0.75   # FLIP

Compiles the real train step of the config (mmcl.train.loop.setup) on the available devices
(or `--devices` forced host devices), feeds it one batch of random images and texts of the
right shapes, and prints:
  examples_per_sec    median over `--steps` timed steps after `--warmup` steps
  flops_per_example   from the compiled executable's cost analysis (all devices; it counts
                      a loop body once, so under `model.scan=True` it undercounts the layers)
  analytic_flops_per_example, flops_ratio   mmcl.models.flops' matmul count; XLA / analytic
  achieved_flops_per_sec   analytic FLOPs x examples/s
  matmul_flops_per_sec     a `--matmul`-sized fp32 square matmul on device 0, timed right
                      after each timed step (median)
  mfu                 median over steps of achieved / the matmul timed after it: against the
                      device's measured, not its nominal, peak, under the same load
  mfu_compiled        mfu by the compiled step's FLOPs (x flops_ratio): the training log's
                      train/mfu (mmcl/train/logger.py; compare with the same --matmul)
  peak_bytes_per_device    arguments + outputs + temporaries - donated aliases
  donated_bytes_per_device what donating the state saves (the aliased state buffers)
  compile_sec, collectives (bytes per step by kind; mmcl.parallel.hlo)
  page_faults_per_step, kernel_cpu_sec_per_step   host page faults and kernel CPU time of a
                      step (median): what a fresh mapping of XLA's temporaries costs
  malloc_huge_pages   whether XLA's per-step buffers get huge pages (mmcl/hostmem.py; the
                      tool re-executes itself to turn them on unless MMCL_HUGE_PAGES=0)
`--steps 0` compiles only: no timing figures (e.g. compile time of a large config).
`--trace DIR` also traces two steps and prints where their time went: HLO op kind and the
model code (op_name) that made each op.
With `--reference open_clip` it also times open_clip's CLIP of configs/bench_small.py (an
AdamW step on a batch of the same shape) in the same process, when torch and open_clip are
installed (optional: see BENCHMARKS.md), and adds `reference_examples_per_sec` and `ratio`.
`--patch_dropout R1,R2,...` prints one line per FLIP patch-dropout ratio (the image tower's
`patch_dropout`, docs/resolution.md), each with its `patch_dropout` figure.
`--roofline CHIP:N,...` instead prints, from shapes only, per-chip lower bounds (compute, HBM,
collectives) of B/16, L/14 and LIMoE-B/16 train steps on TPU slices (see `roofline`).
"""
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def define_flags():
  """The flags of this tool (not defined on import: bench_input imports the functions)."""
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/bench_small.py.')
  flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s batch_size).')
  flags.DEFINE_integer('steps', 10, 'Timed steps; 0: compile only (no timing figures).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
  flags.DEFINE_integer('devices', None, 'Forced host devices (CPU); default: what JAX sees.')
  flags.DEFINE_integer('matmul', 2048, 'Side of the square fp32 matmul that measures peak.')
  flags.DEFINE_enum('reference', None, ['open_clip'], 'Also time this reference model.')
  flags.DEFINE_bool('collectives', False, 'Also print the table of collectives (stderr).')
  flags.DEFINE_string('trace', None, 'After timing, trace 2 steps with jax.profiler into this '
                      'directory and print the ops that took the most time (stderr).')
  flags.DEFINE_list('patch_dropout', None, 'One row per image patch-dropout ratio (FLIP), '
                    'e.g. 0,0.5,0.75.')
  flags.DEFINE_list('roofline', None, 'Instead: roofline rows for CHIP:N slices, e.g. '
                    'v4:256,v5e:256 (chips), of B/16, L/14 and LIMoE-B/16 at --batch.')


def median_seconds(fn, steps: int, warmup: int) -> float:
  """Median wall time of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def random_batch(config, batch: int, seed: int = 0) -> dict:
  """Images in [-1, 1] and texts of random length (token ids >= 1, then 0-padding)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  size, length = config.image_size, config.text_len
  vocab = config.model.get('vocab_size') or config.model.text.vocab_size
  text = rng.integers(1, vocab, size=(batch, length), dtype=np.int32)
  lengths = rng.integers(length // 4, length + 1, size=(batch, 1))
  text = np.where(np.arange(length)[None] < lengths, text, 0).astype(np.int32)
  image = rng.uniform(-1, 1, size=(batch, size, size, 3)).astype(np.float32)
  out = {'image': image, 'text': text}
  dec = config.model.get('decoder')
  if dec:  # The captioning decoder's targets (mmcl/data/decoder_tasks.py), all scored.
    n = dec.get('max_len', 64)
    out['dec_tokens'] = rng.integers(1, dec['vocab_size'], size=(batch, n), dtype=np.int32)
    out['dec_loss_mask'] = np.ones((batch, n), np.int32)
  return out


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
          m.alias_size_in_bytes)
  # Donated bytes: the old state's buffers reused for the new state (without donation the
  # peak would be higher by this much).
  return {'peak_bytes_per_device': int(peak), 'temp_bytes_per_device': int(m.temp_size_in_bytes),
          'donated_bytes_per_device': int(m.alias_size_in_bytes)}


def bench_step(config, steps: int, warmup: int, matmul: int = 2048,
               trace_dir: str | None = None) -> dict:
  """Compiles and times `config`'s train step; the figures of the module docstring."""
  import jax
  from mmcl import hostmem
  from mmcl.models import flops as flops_lib
  from mmcl.parallel import hlo
  from mmcl.train import loop
  from mmcl.train import step as step_lib
  from mmcl.train import throughput

  batch = config.batch_size
  start = time.perf_counter()
  s = loop.setup(config)
  compiled = s.train_step.lower(s.sharded_abstract_state(), s.batch_shapes).compile()
  compile_sec = time.perf_counter() - start

  devices = s.mesh.size
  xla_flops = throughput.step_flops(compiled) * devices / batch  # Per device: times all.
  analytic = flops_lib.train_step_flops(config.model, config.image_size, config.text_len,
                                        global_batch=batch, local_batch=batch // devices)
  colls = hlo.collectives(compiled)
  row = dict(batch=batch, devices=devices, device_kind=jax.devices()[0].device_kind,
             malloc_huge_pages=hostmem.enabled(),
             flops_per_example=xla_flops, analytic_flops_per_example=analytic['train'],
             flops_ratio=round(xla_flops / analytic['train'], 4),
             **memory(compiled), compile_sec=round(compile_sec, 2),
             collectives={k: v['bytes'] for k, v in hlo.summary(colls).items()},
             _colls=colls)
  if steps == 0:
    return row

  state = s.init_state(jax.random.key(config.seed))
  data = jax.device_put(random_batch(config, batch),
                        {k: v.sharding for k, v in s.batch_shapes.items()})
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], data)
    jax.block_until_ready((holder[0], metrics))

  # Each timed step is followed by one timed matmul, so that MFU compares the two under the
  # same load (the machine may be shared); the medians are reported.
  matmul_rate = throughput.matmul_timer(matmul)
  for _ in range(warmup):
    one_step()
  secs, rates, host = [], [], []
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    one_step()
    secs.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    host.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    rates.append(matmul_rate())
  if trace_dir:
    trace_ops(one_step, compiled, trace_dir)
  sec, rate = statistics.median(secs), statistics.median(rates)
  # Forced host devices share the CPU's cores, which one device's matmul already uses.
  per_peak = 1 if jax.devices()[0].platform == 'cpu' else devices
  achieved = analytic['train'] * batch / sec
  mfu = statistics.median(analytic['train'] * batch / t / (r * per_peak)
                          for t, r in zip(secs, rates))
  return dict(examples_per_sec=round(batch / sec, 2), step_sec=round(sec, 4),
              achieved_flops_per_sec=achieved, matmul_flops_per_sec=rate, mfu=round(mfu, 4),
              mfu_compiled=round(mfu * row['flops_ratio'], 4),
              page_faults_per_step=int(statistics.median(h[0] for h in host)),
              kernel_cpu_sec_per_step=round(statistics.median(h[1] for h in host), 3),
              **row)


def trace_ops(one_step, compiled, trace_dir: str, steps: int = 2, top: int = 25):
  """Traces `steps` steps into `trace_dir` (TensorBoard / Perfetto) and prints (stderr) the
  ops that took the most thread time per step, with their share (mmcl.train.profile)."""
  from mmcl.train import profile

  def run_steps():
    for _ in range(steps):
      one_step()
  profile.trace(run_steps, trace_dir)
  profile.print_op_summary(trace_dir, compiled, steps, top)


def import_torch_first():
  """Imports open_clip before TensorFlow loads: torchvision's ops segfault when imported after it."""
  try:
    import open_clip  # noqa: F401  (torch 2.14.1 / torchvision 0.29.1 beside TF 2.21)
  except ImportError:
    pass


def open_clip_step(batch: int, steps: int, warmup: int, seed: int = 0) -> dict | None:
  """Seconds per AdamW train step of open_clip's bench_small CLIP, or None without torch."""
  try:
    import open_clip  # Optional: see BENCHMARKS.md.
    import torch
  except ImportError:
    return None
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(
      embed_dim=256, vision_cfg=dict(image_size=64, layers=6, width=256, head_width=64,
                                     patch_size=8),
      text_cfg=dict(context_length=32, vocab_size=4096, width=256, heads=4, layers=4),
      output_dict=True)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                          weight_decay=0.1)
  image = torch.rand(batch, 3, 64, 64) * 2 - 1
  text = torch.randint(1, 4096, (batch, 32))
  labels = torch.arange(batch)

  def one_step():  # open_clip's ClipLoss on one device, its train loop's clip and clamp.
    opt.zero_grad(set_to_none=True)
    out = model(image, text)
    zimg, ztxt, scale = out['image_features'], out['text_features'], out['logit_scale']
    logits = scale * zimg @ ztxt.T
    loss = (torch.nn.functional.cross_entropy(logits, labels) +
            torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, 4.6052)

  sec = median_seconds(one_step, steps, warmup)
  return {'reference': 'open_clip', 'reference_examples_per_sec': round(batch / sec, 2),
          'reference_params': sum(p.numel() for p in model.parameters()),
          'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}


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
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if f.roofline:
    for slice_ in f.roofline:
      chip, chips = slice_.split(':')
      for name, (model, size, length, experts) in paper_models().items():
        print(json.dumps(roofline(name, model, size, length, f.batch or 32_768, chip,
                                  int(chips), experts)), flush=True)
    return
  if f.config is None:
    raise app.UsageError('--config is required (or --roofline).')
  if f.reference == 'open_clip':
    import_torch_first()
  if f.devices:  # Before the first jax import.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={f.devices}')
  config = f.config
  if f.batch:
    config.batch_size = f.batch
  config.progress_bar = False
  for ratio in f.patch_dropout or [None]:
    if ratio is not None:
      with config.unlocked():  # TwoTowers keeps it in the image tower, LIMoE at the top.
        tower = config.model if config.model.name == 'limoe' else config.model.image
        tower.patch_dropout = float(ratio)
    row = bench_step(config, f.steps, f.warmup, f.matmul, f.trace)
    if ratio is not None:
      row = {'patch_dropout': float(ratio), **row}
    _print_row(f, config, row)


def _print_row(f, config, row):
  colls = row.pop('_colls')
  if f.collectives:
    from mmcl.parallel import hlo
    print(hlo.format_table(colls), file=sys.stderr)
  if f.reference == 'open_clip' and f.steps:
    ref = open_clip_step(config.batch_size, f.steps, f.warmup)
    if ref is None:
      row['reference'] = 'open_clip not installed (pip install torch open_clip_torch)'
    else:
      row.update(ref)
      row['ratio'] = round(row['examples_per_sec'] / ref['reference_examples_per_sec'], 3)
  print(json.dumps(row), flush=True)


if __name__ == '__main__':
  from mmcl import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see mmcl/hostmem.py.
  define_flags()
  app.run(main)
