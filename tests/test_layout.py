"""The package's layout holds: no import cycles between murmur modules (imports inside functions
count too), a docstring for every subpackage and nothing re-exported from it, and a top-level
`murmur` that exports only the public API."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "murmur"


def _modules() -> dict[str, Path]:
    """murmur module name -> file ('murmur.engine' for murmur/engine/__init__.py)."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The murmur modules `name` imports anywhere in its file. A parent package that Python runs
    on the way (murmur/__init__.py for every murmur.x) is not counted: only what the code names."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
            out |= subs  # `from murmur.eval import scoring`: the submodule
            if len(subs) < len(node.names):  # a name defined in `target` itself
                out.add(target)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_every_kind_of_import():
    g = _graph()
    assert "murmur.engine.runner" in g["murmur.transcribe"]  # top-level, absolute
    assert "murmur.output.stitcher" in g["murmur.transcribe"]  # inside a function
    assert "murmur.eval.scoring" in g["murmur.eval.cli"]  # `from murmur.eval import scoring`
    assert "murmur.engine.duo" in g["murmur.engine.kv.policies"]


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("init", sorted(p for p in PKG.rglob("__init__.py") if p.parent != PKG),
                         ids=lambda p: str(p.parent.relative_to(PKG.parent)))
def test_subpackages_say_their_job_and_export_nothing(init):
    tree = ast.parse(init.read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree)
    assert doc and doc.strip(), f"{init} needs a one-line docstring saying its job"
    # modules are imported by their full path, so a package holds nothing but its docstring
    assert len(tree.body) == 1, f"{init} should hold only its docstring"


def test_every_folder_of_modules_is_a_package():
    for d in {p.parent for p in PKG.rglob("*.py")}:
        assert (d / "__init__.py").is_file(), f"{d} has modules but no __init__.py"


def test_murmur_exports_only_the_public_api():
    import murmur

    assert sorted(murmur.__all__) == sorted([
        "transcribe", "load_model", "TranscribeOptions", "DecodingOptions",
        "MurmurError", "AudioError", "ModelError", "OptionsError",
        "Segment", "Transcript", "Turn", "Word",
        "StreamingTranscriber", "StreamOptions"])  # issue 14: murmur.StreamingTranscriber(model, ...)
    assert murmur.__version__
    # nothing else public at the top: the rest is imported by its full path
    tree = ast.parse((PKG / "__init__.py").read_text(encoding="utf-8"))
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported == set(murmur.__all__)
