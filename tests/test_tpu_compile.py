"""TPU programs compiled ahead of time on the CPU (libtpu, no TPU): fit, collectives, precision.

Each compile runs the real TPU compiler for a topology's devices through the same `setup`
as training; the tiny demo compiles in ~10 s for a 4-chip slice.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('libtpu', reason="libtpu comes with the test extra: pip install -e '.[test]'")

import jax  # noqa: E402

from configs import demo  # noqa: E402
from mmcl.parallel import hlo, topology  # noqa: E402
from mmcl.train import compile_report, loop  # noqa: E402


def _tiny(**overrides):
  c = demo.get_config('tiny')
  c.progress_bar = False
  c.model.image.depth = c.model.text.depth = 1  # One block shows every pattern.
  for k, v in overrides.items():
    c[k] = v
  return c


def _peak(m):
  """The peak HBM of an executable's memory_analysis(): what its arguments and outputs keep
  (donated buffers counted once), its temporaries and its code."""
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
          m.temp_size_in_bytes + m.generated_code_size_in_bytes)


@pytest.fixture(scope='module')
def v5e_compiled():
  executables = {}
  r = compile_report.report(_tiny(), topology.devices('v5e:2x2'), evals=True,
                            executables=executables)
  return r, executables


@pytest.fixture(scope='module')
def v5e_report(v5e_compiled):
  return v5e_compiled[0]


def test_topology_devices_are_one_per_chip_for_every_chip():
  for name, chips in (('v5e:2x2', 4), ('v4:2x2x1', 4), ('v5p:2x2x1', 4), ('v6e:2x2', 4)):
    devices = topology.devices(name)
    assert len(devices) == chips, name
    assert topology.chip_of(devices[0]).name == name.split(':')[0]
  assert len(topology.devices('v5e:2x2', slices=2)) == 8
  with pytest.raises(ValueError, match='v5e:16x16'):
    topology.parse('v5x:2x2')


def test_v5e_report_equals_the_compilers_own_figures(v5e_compiled):
  r, executables = v5e_compiled
  s = loop.setup(_tiny(), topology.devices('v5e:2x2'))
  compiled = executables['train_step']
  m = compiled.memory_analysis()
  assert r['memory']['temp_bytes'] == m.temp_size_in_bytes
  assert r['memory']['peak_bytes'] == _peak(m)
  cost = compiled.cost_analysis()
  assert r['flops']['xla_per_chip'] == float(cost['flops'])
  assert r['fits'] and 0.9 < r['memory']['margin'] < 1
  assert r['memory']['capacity_bytes'] == 16 * 2**30
  # Parameters are replicated under pure data parallelism: every chip holds all of them.
  params = s.abstract_state['params']
  assert r['memory']['params_bytes'] == sum(x.size * x.dtype.itemsize
                                            for x in jax.tree.leaves(params))
  assert set(r['evals']) == {'embed_images', 'embed_texts'}
  for name, row in r['evals'].items():
    assert row['peak_bytes'] == _peak(executables[name].memory_analysis())


def test_v5e_step_holds_only_the_gradient_reduction_and_the_embedding_exchange(v5e_report):
  r = v5e_report
  config = _tiny()
  b_x_d = config.batch_size * config.model.embed_dim
  gathers = [c for c in r['collectives'] if c['kind'] == 'all-gather']
  # One logical gather per embedding, whatever pieces the compiler split it into; float32:
  # the loss's logits run at full precision (a bf16 gather would mean bf16 logits).
  assert [(c['bytes'], c['dtypes'], c['executions'], c['axes']) for c in gathers] == [
      (b_x_d * 4, ['f32'], 1, ['data'])] * 2
  assert {c['kind'] for c in r['collectives']} <= {'all-gather', 'all-reduce',
                                                    'reduce-scatter'}
  s = loop.setup(config, topology.devices('v5e:2x2'))
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(s.abstract_state['params']))
  reduced = sum(c['bytes'] for c in r['collectives'] if c['kind'] == 'all-reduce')
  # The gradients, plus at most the two [B, D] embedding gradients (which the TPU compiler
  # may all-reduce instead of reduce-scatter at this size) and scalars.
  assert param_bytes <= reduced <= param_bytes + 2 * b_x_d * 4 + 64
  assert abs(r['comm']['excess']) < 0.05 and 'problem' not in r['comm']


def test_two_v4_megacore_slices_compile_with_the_data_axis_across_the_dcn():
  r = compile_report.report(_tiny(), topology.devices('v4:2x2x1', slices=2), evals=False)
  assert r['device_kind'] == 'TPU v4' and r['devices'] == 8 and r['fits']
  assert r['memory']['capacity_bytes'] == 32 * 2**30
  # Across slices the compiler splits the embedding gathers into more pieces than one
  # slice's async chains, all of them over the batch axis.
  gathers = [c for c in r['collectives'] if c['kind'] == 'all-gather']
  assert len(gathers) >= 2 and all(c['axes'] == ['data'] for c in gathers)
  assert r['slices'] == 2 and r['mesh'] == {'data': 8}
  assert r['comm']['dcn_wire_bytes'] > 0 and r['bounds_ms']['dcn'] > 0


def test_too_large_a_step_is_reported_with_the_compilers_figures():
  config = _tiny(batch_size=8192, image_size=256)
  config.input.pp = config.input.pp.replace('decode|', 'decode|resize(256)|')
  r = compile_report.report(config, topology.devices('v5e:2x2'), evals=False)
  assert r['fits'] is False
  assert r['memory']['required_bytes'] > r['memory']['available_bytes'] > 15 * 2**30
  assert any('remat' in tip for tip in r['advice'])
  assert any('accum_steps' in tip for tip in r['advice'])


def test_mis_sharded_step_is_flagged():
  config = _tiny()
  # A weight split over the batch axis: gathered every step on top of the minimum.
  config.sharding_rules = (('.*img/.*/MlpBlock_0/Dense_0/kernel', (None, 'data')),
                           ('.*txt/.*/MlpBlock_0/Dense_0/kernel', (None, 'data')),
                           ('.*', 'replicate'))
  r = compile_report.report(config, topology.devices('v5e:2x2'), evals=False)
  assert r['comm']['excess'] > 0.05, r['comm']
  assert 'analytic minimum' in r['comm']['problem']


def test_compile_tool_prints_the_table_and_one_json_line(tmp_path):
  out = subprocess.run(
      [sys.executable, 'tools/compile.py', '--config', 'configs/demo.py:tiny',
       '--topology', 'v5e:2x2', '--noevals', '--hlo', str(tmp_path)],
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row['fits'] and row['topology'] == 'v5e:2x2'
  assert 'Logical collectives per step' in out.stderr and 'margin' in out.stderr
  text = (tmp_path / 'train_step.hlo.txt').read_text()
  assert len(hlo.collectives(text)) == len(row['collectives'])


CHAINED = """
HloModule m

%fused_start (p: f32[2,4]) -> f32[8,4] {
  %p = f32[2,4]{1,0} parameter(0)
  ROOT %all-gather.1 = f32[8,4]{1,0} all-gather(%p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="0"}
}

%fused_continue (p: f32[2,4]) -> f32[8,4] {
  %p = f32[2,4]{1,0} parameter(0)
  ROOT %all-gather.2 = f32[8,4]{1,0} all-gather(%p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="0"}
}

%body (c: (s32[], f32[2,4])) -> (s32[], f32[2,4]) {
  %c = (s32[], f32[2,4]{1,0}) parameter(0)
  %x = f32[2,4]{1,0} get-tuple-element(%c), index=1
  %cp = f32[2,4]{1,0} collective-permute(%x), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %t = (s32[], f32[2,4]{1,0}) tuple(%i, %cp)
}

ENTRY %main (a: f32[2,4]) -> f32[8,4] {
  %a = f32[2,4]{1,0} parameter(0)
  %s = f32[8,4]{1,0} fusion(%a), kind=kCustom, calls=%fused_start
  %c = f32[8,4]{1,0} fusion(%a), kind=kCustom, calls=%fused_continue
  %w = (s32[], f32[2,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[8,4]{1,0} all-reduce(%c), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
}
"""


def test_parser_counts_chains_once_and_loop_bodies_per_iteration():
  colls = hlo.collectives(CHAINED)
  assert [(c.kind, c.executions, c.bytes) for c in colls] == [
      ('all-gather', 1, 128), ('collective-permute', 3, 32), ('all-reduce', 1, 128)]
  # Iota groups with a transpose: [2,2]<=[2,2]T(1,0) is {{0,2},{1,3}}.
  assert colls[2].group == (0, 2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('data', 'fsdp'))
  assert hlo.mesh_axes(colls[2], mesh) == ('data',)
  assert hlo.summary(colls)['collective-permute'] == {
      'count': 1, 'executions': 3, 'bytes': 96, 'wire_bytes': 96.0}


def test_parser_reads_mesh_replica_groups_with_device_ids():
  line = ("  %ag = bf16[16,72]{1,0} all-gather(%p), channel_id=3, replica_groups=mesh['a'=1,"
          "'b'=2,'c'=4], device_ids=([4,2]T(1,0)) {'c'}, dimensions={0}")
  (c,) = hlo.collectives(line)
  # ids [4,2]T(1,0) flattened: 0 2 4 6 1 3 5 7 as a (1, 2, 4) grid; 'c' at a=0, b=0.
  assert c.group == (0, 2, 4, 6) and c.group_size == 4
  (c,) = hlo.collectives(line.replace(", device_ids=([4,2]T(1,0))", ''))
  assert c.group == (0, 1, 2, 3)


def test_bounds_under_gradcache_do_not_trust_a_loop_body_counted_once():
  chip = topology.CHIPS['v5e']
  flops = dict(xla_per_chip=1e12, model_per_chip=6e12, hbm_bytes_accessed=4e10)
  plain = compile_report.step_bounds(flops, wire=2e9, dcn=0.0, chip=chip)
  assert plain['compute'] == pytest.approx(1e3 * 1e12 / chip.peak_flops, abs=0.01)
  assert plain['hbm'] == pytest.approx(1e3 * 4e10 / chip.hbm_bw, abs=0.01)
  accum = compile_report.step_bounds(flops, wire=2e9, dcn=0.0, chip=chip, accum=8)
  assert accum['compute'] == pytest.approx(1e3 * 6e12 / chip.peak_flops, abs=0.01)
  assert accum['hbm'] == pytest.approx(8 * plain['hbm'], abs=0.1)
  assert accum['ici'] == plain['ici'] == pytest.approx(1e3 * 2e9 / chip.ici_bw, abs=0.01)
