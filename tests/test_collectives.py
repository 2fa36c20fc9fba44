"""The communication check: the compiled data-parallel train step moves only what it must.

Under pure data parallelism (mesh ('data', 8)) the only collectives of a contrastive step
are the gradient all-reduce (parameter bytes, however XLA combines it), the loss's
embedding all-gathers and their reduce-scatters ([B, D] each), and scalar reductions.
"""

from configs import demo
from mmcl.parallel import hlo
from mmcl.train import loop


def _compile(config):
  """(parameter shapes, compiled train step) of `config`, from shapes only."""
  s = loop.setup(config)
  return s.abstract_state['params'], s.compile()


def _dp_config(text_pool=None):
  c = demo.get_config('tiny')
  c.mesh = (('data', 8),)
  c.progress_bar = False
  c.model.image.depth = c.model.text.depth = 1  # Compile time; one block shows every pattern.
  if text_pool:
    c.model.text.pool = text_pool
  return c


def _problems(config):
  params, compiled = _compile(config)
  colls = hlo.collectives(compiled)
  embedding_bytes = config.batch_size * config.model.embed_dim * 4
  return colls, hlo.data_parallel_problems(colls, param_shapes=params,
                                           embedding_bytes=embedding_bytes)


def test_data_parallel_step_has_only_the_minimal_collectives():
  config = _dp_config(text_pool='last')  # The default EOT pooling: the next test.
  colls, problems = _problems(config)
  assert not problems, hlo.format_table(colls)
  kinds = hlo.summary(colls)
  assert set(kinds) == {'all-reduce', 'all-gather', 'reduce-scatter'}, kinds
  b_x_d_bytes = config.batch_size * config.model.embed_dim * 4
  assert kinds['all-gather'] == {'count': 2, 'executions': 2, 'bytes': 2 * b_x_d_bytes,
                                 'wire_bytes': 2 * b_x_d_bytes * 7 / 8}


def test_data_parallel_step_with_eot_pooling_is_minimal():
  colls, problems = _problems(_dp_config())
  assert not problems, hlo.format_table(colls)


def test_mis_sharded_step_is_caught():
  config = _dp_config(text_pool='last')
  # A parameter sharded over the batch axis: every step all-gathers it (and reduce-scatters
  # its gradient) on top of the data-parallel collectives.
  # (The leading '.*': rules also see the state's 'params/' prefix.)
  config.sharding_rules = (('.*img/.*/MlpBlock_0/Dense_0/kernel', (None, 'data')),
                           ('.*', 'replicate'))
  colls, problems = _problems(config)
  assert any(p.startswith('all-gather not of one [B, D] embedding') and 'MlpBlock' in p
             for p in problems), (problems, hlo.format_table(colls))


HLO = """
  %ag-start = (f32[4,64]{1,0}, f32[32,64]{1,0}) all-gather-start(f32[4,64]{1,0} %p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ag-done = f32[32,64]{1,0} all-gather-done(%ag-start)
  %ar = (f32[]{:T(128)}, bf16[10,8]{1,0}) all-reduce(%a, %b), replica_groups={{0,1},{2,3}}, to_apply=%add, metadata={op_name="jit(f)/psum"}
  %rs = f32[2,8]{1,0} reduce-scatter(%x), replica_groups=mesh['data'=4,'fsdp'=2] {'data'}, dimensions={0}
  ROOT %cp = s32[3]{0} collective-permute(%y), source_target_pairs={{0,1},{1,2},{2,0}}
  %not = f32[2] add(%all-gather, %z)
"""


def test_parser_reads_each_form_of_collective():
  colls = hlo.collectives(HLO)
  assert [(c.kind, c.bytes, c.group_size) for c in colls] == [
      ('all-gather', 32 * 64 * 4, 4), ('all-reduce', 4 + 160, 2),
      ('reduce-scatter', 2 * 8 * 4 * 4, 4), ('collective-permute', 12, 3)]
  assert colls[1].op_name == 'jit(f)/psum' and colls[1].wire_bytes == 164
  assert hlo.summary(colls)['all-gather']['wire_bytes'] == 32 * 64 * 4 * 3 / 4
