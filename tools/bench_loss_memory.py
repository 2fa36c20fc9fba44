r"""Per-device memory and time of contrastive losses: every loss x impl x batch x dim.

Compiles jit(value_and_grad) of the loss (w.r.t. both embeddings, temperature and bias)
on N forced host devices and prints one JSON line per case:
  {"loss", "impl", "global_batch", "dim", "devices", "temp_bytes_per_device", "ms_per_call"}
Memory comes from the compiled executable's memory analysis (nothing is allocated);
time is the median over `--repeats` calls, measured only up to `--max_timed_batch`.

  python tools/bench_loss_memory.py --losses softmax,sigmoid --impls gather,ring \
      --batches 8192,65536,1048576 --dims 512 --devices 8

With `--accum_config configs/demo.py --accum 1,4` it instead compiles that config's whole
train step for each GradCache `accum_steps` and prints its per-device temp memory: the
activation memory that accumulation saves.
"""
import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--losses', default='softmax,sigmoid')
  p.add_argument('--impls', default='gather,ring')
  p.add_argument('--batches', default='8192,65536')
  p.add_argument('--dims', default='512')
  p.add_argument('--devices', type=int, default=8, help='Forced host devices (CPU).')
  p.add_argument('--chunk', type=int, default=1024, help='Ring tile side.')
  p.add_argument('--max_timed_batch', type=int, default=16384)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--accum_config', default='', help='CONFIG.py[:arg] for the accum mode.')
  p.add_argument('--accum', default='1,4')
  return p.parse_args(argv)


def bench_accum(config_arg: str, accums, devices: int):
  """Per-device temp memory of a config's compiled train step for each accum_steps."""
  import importlib.util
  import jax
  from mmcl.train import loop
  path, _, arg = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for accum in accums:
    config = module.get_config(arg)
    config.accum_steps = accum
    compiled = loop.compile_train_step(config)
    print(json.dumps(dict(config=config_arg, accum_steps=accum, global_batch=config.batch_size,
                          devices=devices, temp_bytes_per_device=(
                              compiled.memory_analysis().temp_size_in_bytes))), flush=True)


def main(argv=None):
  args = parse_args(argv)
  # Must precede the first jax import.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  if args.accum_config:
    return bench_accum(args.accum_config, [int(a) for a in args.accum.split(',')],
                       args.devices)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mmcl import losses
  from mmcl.parallel import mesh as mesh_lib

  mesh = mesh_lib.create_mesh([('data', args.devices)])
  sharding = mesh_lib.batch_sharding(mesh)
  for name in args.losses.split(','):
    bias = 0.0 if losses.get_loss(name, 'global').needs_bias else None
    for impl in args.impls.split(','):
      fn = losses.make_loss_fn(name, impl, mesh, chunk=args.chunk)
      grad_fn = jax.jit(jax.value_and_grad(
          lambda zi, zt, s, b: fn(zi, zt, s, b)[0], argnums=(0, 1, 2, 3)))
      for batch in map(int, args.batches.split(',')):
        for dim in map(int, args.dims.split(',')):
          emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
          scalar = jax.ShapeDtypeStruct((), jnp.float32)
          compiled = grad_fn.lower(emb, emb, scalar, None if bias is None else scalar).compile()
          row = dict(loss=name, impl=impl, global_batch=batch, dim=dim, devices=args.devices,
                     temp_bytes_per_device=compiled.memory_analysis().temp_size_in_bytes,
                     ms_per_call=None)
          if batch <= args.max_timed_batch:
            rng = np.random.default_rng(0)
            z = rng.normal(size=(2, batch, dim)).astype(np.float32)
            z /= np.linalg.norm(z, axis=-1, keepdims=True)
            inputs = (jax.device_put(z[0], sharding), jax.device_put(z[1], sharding),
                      jnp.float32(10.0), None if bias is None else jnp.float32(-10.0))
            jax.block_until_ready(compiled(*inputs))  # Warm-up.
            times = []
            for _ in range(args.repeats):
              start = time.perf_counter()
              jax.block_until_ready(compiled(*inputs))
              times.append(1e3 * (time.perf_counter() - start))
            row['ms_per_call'] = round(statistics.median(times), 2)
          print(json.dumps(row), flush=True)


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tools import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see tools/hostmem.py.
  main(sys.argv[1:])
