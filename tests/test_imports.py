"""The package's import graph: imports point down the layers of DESIGN.md, and no cycles.

Read from the source (every import statement, those inside functions included), so a lazy
import that hides a cycle from Python does not hide it from this test.
"""
import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'mmcl'
# A package may import only packages of a lower layer (DESIGN.md, "The house").
LAYERS = {
    'train': 5,
    'evaluate': 4, 'convert': 4,
    'losses': 3, 'models': 3,
    'data': 2, 'parallel': 2, 'checkpoint': 2,
    'fs': 1, 'tree': 1,
}


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix('').parts)
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  modules = {_module(p): p for p in ROOT.rglob('*.py')}
  graph = collections.defaultdict(set)
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        # `from pkg import mod` imports the module mod (the package's __init__ runs too, but
        # an __init__ importing its own modules is no cycle); `from mod import name`, mod.
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
                   else node.module for a in node.names]
      else:
        continue
      graph[name].update(t for t in targets if t in modules and t not in (name, 'mmcl'))
  return graph


def _layer(module: str) -> str:
  return module.split('.')[1]


def test_every_package_has_a_layer():
  assert {_layer(m) for m in import_graph()} <= set(LAYERS), (
      'a new package or top-level module: give it a layer in LAYERS')


def test_imports_point_down_the_layers():
  bad = sorted(f'{a} imports {b}' for a, bs in import_graph().items() for b in bs
               if _layer(a) != _layer(b) and LAYERS[_layer(a)] <= LAYERS[_layer(b)])
  assert not bad, bad


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = 'open'
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 'open':
        cycles.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n, stack + [n])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  return cycles


def test_no_import_cycles():
  assert not find_cycles(import_graph())


def test_the_checks_can_fail():
  graph = {'mmcl.models.vit': {'mmcl.train.loop'}}
  assert [f'{a} imports {b}' for a, bs in graph.items() for b in bs
          if LAYERS[_layer(a)] <= LAYERS[_layer(b)]] == ['mmcl.models.vit imports mmcl.train.loop']
  assert find_cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]
