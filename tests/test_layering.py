"""The package's import layering: no module imports a higher layer, no import cycles.

Read from the source with ``ast`` (imports inside functions included), so nothing is imported here.
Layers, low to high: storage, lockfile, multihost and tpu_target; layers; models; the users of
models (flops, convert, pretrained, export, data, metrics); train; tools.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'dtf_jax'
LAYERS = (
    ('dtf_jax', 'dtf_jax.errors', 'dtf_jax.storage', 'dtf_jax.lockfile', 'dtf_jax.multihost',
     'dtf_jax.tpu_target'),
    ('dtf_jax.layers',),
    ('dtf_jax.models',),
    ('dtf_jax.flops', 'dtf_jax.convert', 'dtf_jax.pretrained', 'dtf_jax.export', 'dtf_jax.data',
     'dtf_jax.metrics'),
    ('dtf_jax.train',),
    ('dtf_jax.tools',),
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _layer(module: str) -> int:
  """Index in LAYERS of the longest entry that is ``module`` or a package above it."""
  best, rank = '', None
  for i, names in enumerate(LAYERS):
    for name in names:
      if (module == name or module.startswith(name + '.')) and len(name) > len(best):
        best, rank = name, i
  if rank is None:
    raise AssertionError(f'{module} is in no layer of tests/test_layering.py: add it')
  return rank


def _imports(path: pathlib.Path, modules: set) -> set:
  """The package modules that ``path`` imports (``from A import b`` counts A.b if it is a module)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f'{path}: relative import; the package uses absolute imports'
      if node.module:
        found.add(node.module)
        found.update(f'{node.module}.{alias.name}' for alias in node.names)
  return {name for name in found if name in modules}


def _graph():
  paths = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  modules = set(paths)
  return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def test_no_module_imports_a_higher_layer():
  upward = [f'{name} (layer {_layer(name)}) imports {imported} (layer {_layer(imported)})'
            for name, imported_set in sorted(_graph().items()) for imported in sorted(imported_set)
            if _layer(imported) > _layer(name)]
  assert not upward, '\n'.join(upward)


def _without_package_inits(graph):
  """Drops the edges of a package ``__init__`` to its own submodules (re-exports) and the edges
  of a submodule to its own package: these do not make cycles between modules of one concept."""
  def own(a, b):
    return b.startswith(a + '.') or a.startswith(b + '.')
  return {a: {b for b in bs if not own(a, b)} for a, bs in graph.items()}


def _cycle(graph):
  """One import cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycles():
  cycle = _cycle(_without_package_inits(_graph()))
  assert cycle is None, ' -> '.join(cycle)


@pytest.mark.parametrize('graph, expected', [
    ({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}, ['a', 'b', 'c', 'a']),
    ({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}, None),
])
def test_cycle_finder(graph, expected):
  assert _cycle(graph) == expected


def test_layer_check_sees_an_upward_import():
  assert _layer('dtf_jax.models.resnet') < _layer('dtf_jax.train.loop')
  assert _layer('dtf_jax.storage') == 0 and _layer('dtf_jax.tools.model_info') == 5
