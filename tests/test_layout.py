"""The package's import graph, read from the source (AST; nothing is imported).

Layers, bottom to top: errors, runtime/, data/, models/, losses/optim/plots,
evaluators/, trainer, stages/, experiments/, main. A module may import from
its own layer or below; the runtime imports no stage; there are no cycles
and no package imports inside functions (the usual way to hide one).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'barlow_jax'
# Sub-packages and modules that the runtime (checkpoints, loop, mesh, ...) must never import.
ABOVE_RUNTIME = ('barlow_jax.stages', 'barlow_jax.experiments', 'barlow_jax.evaluators',
                 'barlow_jax.trainer', 'barlow_jax.main', 'barlow_jax.data', 'barlow_jax.models')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict:
  return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob('*.py')}


def _imported(tree: ast.AST, known: set) -> set:
  """barlow_jax modules a module imports (``from a import b`` counts a.b when it is a module)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('barlow_jax'):
      subs = {f'{node.module}.{a.name}' for a in node.names} & known
      out |= subs or {node.module}
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('barlow_jax')}
  return out & known


def _graph() -> dict:
  modules = _modules()
  known = set(modules)
  return {name: _imported(tree, known) for name, tree in modules.items()}


def _cycle(graph: dict):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_the_graph_is_read():
  graph = _graph()
  assert 'barlow_jax.stages.pretrain' in graph['barlow_jax.main']
  assert 'barlow_jax.runtime.checkpoint' in graph['barlow_jax.trainer']
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_import_cycles():
  assert _cycle(_graph()) is None, ' -> '.join(_cycle(_graph()))


def test_runtime_imports_no_stage():
  for name, imports in _graph().items():
    if name.startswith('barlow_jax.runtime'):
      bad = sorted(m for m in imports if m.startswith(ABOVE_RUNTIME))
      assert not bad, f'{name} imports {bad}'


def _imports_barlow_jax(node: ast.AST) -> bool:
  if isinstance(node, ast.ImportFrom):
    return bool(node.module) and node.module.startswith('barlow_jax')
  return isinstance(node, ast.Import) and any(a.name.startswith('barlow_jax') for a in node.names)


def test_no_package_imports_inside_functions():
  for name, tree in _modules().items():
    for func in ast.walk(tree):
      if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        inner = [n for n in ast.walk(func) if _imports_barlow_jax(n)]
        assert not inner, f'{name}.{func.name} imports inside the function (line {inner[0].lineno})'


def test_functions_stay_short():
  for name, tree in _modules().items():
    for func in ast.walk(tree):
      if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = func.end_lineno - func.lineno + 1
        assert length <= 60, f'{name}.{func.name} is {length} lines'
