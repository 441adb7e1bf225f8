"""The import graph of sparsedsl, codegen and models: no cycle, and data flows one way
(sparsedsl -> codegen -> models: the front end never imports a backend or the model, codegen
never imports the model). Also: importing codegen imports no triton, and codegen's old flat
module paths still import, as the moved modules, with a DeprecationWarning.

Every `import` / `from ... import` statement counts, at module level or inside a function
(a lazy import is still a dependency), relative imports resolved. `from pkg import name`
is an edge to the module pkg.name when there is one, else to pkg. A module's implicit
import of its parent packages is not an edge (it would make every lazy import in an
__init__.py a cycle).
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sparsedsl", "codegen", "models")
#: package -> packages it must never import
FORBIDDEN = {"sparsedsl": ("codegen", "models"), "codegen": ("models",)}


def find_modules(root: Path, packages) -> dict:
    """Dotted module name -> path, for every .py file under the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict):
    """(raw dotted target, line) of every import in the module, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in modules else base), node.lineno


def _resolve(target: str, modules: dict):
    """The longest known module that `target` names (itself or a parent package), or None."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def import_graph(root: Path = ROOT, packages=PACKAGES) -> nx.DiGraph:
    """Modules as nodes; an edge a -> b per import of b in a, with the raw target and line."""
    modules = find_modules(root, packages)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for raw, line in _imports(name, path, modules):
            top = raw.partition(".")[0]
            if top not in packages:
                continue
            target = _resolve(raw, modules) or raw  # an old alias path: keep it visible
            where = f"{path.relative_to(root)}:{line}"
            if graph.has_edge(name, target):
                graph.edges[name, target]["where"].append(where)
            else:
                graph.add_edge(name, target, raw=raw, where=[where])
    return graph


def cycle_report(graph: nx.DiGraph):
    """None if the graph has no cycle, else one cycle as text (module -> ... with the lines)."""
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return None
    return " -> ".join([cycle[0][0]] + [f"{b} ({graph.edges[a, b]['where'][0]})"
                                        for a, b in cycle])


def layering_violations(graph: nx.DiGraph, forbidden=FORBIDDEN):
    bad = []
    for a, b, data in graph.edges(data=True):
        for package, never in forbidden.items():
            if a.partition(".")[0] == package and data["raw"].partition(".")[0] in never:
                bad.append(f"{a} imports {data['raw']} ({', '.join(data['where'])})")
    return bad


def test_no_import_cycles():
    graph = import_graph()
    assert graph.number_of_nodes() > 50  # the walk found the packages
    report = cycle_report(graph)
    assert report is None, f"import cycle: {report}"


def test_data_flows_one_way():
    assert layering_violations(import_graph()) == []


def test_the_checks_catch_a_lazy_cycle_and_a_backwards_import(tmp_path):
    """The same parse on a synthetic tree: a cycle through a function-level relative import,
    and a front-end module importing a backend lazily."""
    (tmp_path / "front").mkdir()
    (tmp_path / "back" / "room").mkdir(parents=True)
    files = {
        "front/__init__.py": "",
        "front/cli.py": "def main():\n    from back.room import low\n",
        "back/__init__.py": "",
        "back/room/__init__.py": "",
        "back/room/low.py": "def f():\n    from .. import top\n",
        "back/top.py": "from .room.low import f\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, ("front", "back"))
    assert graph.has_edge("back.room.low", "back.top") and graph.has_edge("back.top",
                                                                          "back.room.low")
    report = cycle_report(graph)
    assert report is not None and "back.top" in report and "back/room/low.py:2" in report
    assert layering_violations(graph, {"front": ("back",)}) == [
        "front.cli imports back.room.low (front/cli.py:2)"]
    graph.remove_edge("back.room.low", "back.top")
    assert cycle_report(graph) is None


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_importing_codegen_imports_no_triton():
    done = _run("""
        import sys
        import codegen
        assert "triton" not in sys.modules, "importing codegen imported triton"
    """)
    assert done.returncode == 0, done.stderr[-2000:]


def test_old_module_paths_warn_and_give_the_moved_modules():
    done = _run("""
        import warnings
        warnings.simplefilter("error", DeprecationWarning)
        import codegen
        import codegen.memory.rollout_cache as new_rc
        for statement in ("import codegen.rollout_cache",
                          "from codegen.kernel_spec import AttentionKernelSpec",
                          "codegen.torch_backend"):
            try:
                exec(statement)
            except DeprecationWarning as w:
                print(w)
            else:
                raise AssertionError(f"no DeprecationWarning for {statement}")
        warnings.simplefilter("ignore", DeprecationWarning)
        import codegen.rollout_cache as old_rc
        from codegen.kernel_spec import AttentionKernelSpec
        from codegen.attention import kernel_spec, torch_backend
        assert old_rc is new_rc and codegen.torch_backend is torch_backend
        assert AttentionKernelSpec is kernel_spec.AttentionKernelSpec
        assert old_rc.__spec__.name == "codegen.memory.rollout_cache"
        import torch
        import codegen.ops  # the custom ops keep their names
        assert torch.ops.sparsedsl.pbsa_attention.default is not None
        assert torch.ops.sparsedsl.pbsa_attention_backward.default is not None
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines == [
        "codegen.rollout_cache is deprecated: import codegen.memory.rollout_cache instead",
        "codegen.kernel_spec is deprecated: import codegen.attention.kernel_spec instead",
        "codegen.torch_backend is deprecated: import codegen.attention.torch_backend instead",
    ], done.stdout
