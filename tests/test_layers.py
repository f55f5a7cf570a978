"""The layers of shared/DESIGN.md hold in the imports: io/ reads formats only, the loading wing sits above it,
and no import circle (type-only imports count) runs through the lower floors."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "lmx"
# Floors that must stay free of circles (the serving core above them is another issue's).
LOWER = ("lmx.runtime", "lmx.kernels", "lmx.io", "lmx.models", "lmx.tokenizer", "lmx.loading")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every lmx module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _faces_skipped(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` only hands names on: route an import of it to what it re-exports."""
    faces = {m for m, p in _modules().items() if p.name == "__init__.py"}
    resolved: dict[str, set[str]] = {}
    for name, deps in graph.items():
        if name in faces:
            continue
        seen: set[str] = set()
        todo = list(deps)
        while todo:
            dep = todo.pop()
            if dep in seen:
                continue
            seen.add(dep)
            if dep in faces and not dep.startswith(name):
                todo += graph.get(dep, set())
        resolved[name] = {d for d in seen if d not in faces}
    return resolved


def test_io_reads_formats_only():
    graph = _graph()
    upward = {
        (m, d)
        for m, deps in graph.items()
        if m.startswith("lmx.io")
        for d in deps
        if not d.startswith(("lmx.io", "lmx.errors", "lmx.runtime"))
    }
    assert upward == set()


def test_no_circle_in_the_lower_floors():
    circles = [c for c in _circles(_faces_skipped(_graph())) if any(m.startswith(LOWER) for m in c)]
    assert circles == []


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_module_is_imported_from_outside_its_package():
    offenders = []
    for name, path in _modules().items():
        for dep in _imports(path, _modules()):
            private = [i for i, part in enumerate(dep.split(".")) if part.startswith("_") and part != "__init__"]
            if private and not name.startswith(".".join(dep.split(".")[: private[0]])):
                offenders.append((name, dep))
    tree_imports = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmx."):
                owner = node.module
                if not _module_name(path).startswith(owner):
                    tree_imports += [(_module_name(path), f"{owner}.{a.name}") for a in node.names if a.name[0] == "_"]
    assert offenders + tree_imports == []


# An architecture is one file: the loading side reads what models/<arch>.py declares.
ARCH_LITERAL = re.compile(r"""["'](gemma3|gemma3_text|qwen3)["']""")
LOADING_SIDE = ("io/gguf.py", "loading/convert.py", "loading/loader.py", "bench.py", "tokenizer/gguf.py")


def test_the_loading_side_names_no_architecture():
    named = {rel: ARCH_LITERAL.findall((PACKAGE / rel).read_text()) for rel in LOADING_SIDE}
    assert {rel: names for rel, names in named.items() if names} == {}


def test_every_architecture_declares_its_loading_side():
    from lmx.io.gguf import GGUFArchitecture
    from lmx.models import ARCHITECTURES, BENCH_CONFIGS, GGUF_ARCHITECTURES

    for model_type, module in ARCHITECTURES.items():
        assert isinstance(module.GGUF, GGUFArchitecture), model_type
        assert GGUF_ARCHITECTURES[module.GGUF.name] is module.GGUF
        text_module = ARCHITECTURES[module.GGUF.model_type]  # itself, or a multimodal model's text half
        assert text_module.GGUF is module.GGUF
        assert text_module.HF_ARCHITECTURE.endswith("ForCausalLM")
        assert isinstance(module.CHAT_TEMPLATE, str) and module.EXTRA_EOS_TOKENS
        assert module.NEUTRAL_NORM_WEIGHT in (0.0, 1.0)
        for name, config in module.BENCH_CONFIGS.items():
            assert ARCHITECTURES[config["model_type"]] is module and BENCH_CONFIGS[name] is config
