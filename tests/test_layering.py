"""Layers point one way: kernels are leaves, models know nothing of decoding or loading, families do
not import each other, decoding reaches models through the protocol, and no import cycle exists.

Every `import` in the package counts, function-local ones included."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "pdx"
FAMILIES = {"pdx.models.transformer", "pdx.models.mamba2", "pdx.models.sambay"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The pdx modules `name` imports (`from pkg import mod` resolves to the module when it is one)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pdx")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdx"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in MODULES else node.module)
    return out - {name}


GRAPH = {name: imports_of(name) for name in MODULES}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


RULES = [  # (importer prefix, forbidden prefixes)
    ("pdx.kernels_cpu", ["pdx.models", "pdx.decoding", "pdx.io", "pdx.model", "pdx.ssm", "pdx.train", "pdx.cli",
                         "pdx.kernels_pallas"]),
    ("pdx.kernels_pallas", ["pdx.models", "pdx.decoding", "pdx.io", "pdx.model", "pdx.ssm", "pdx.train", "pdx.cli"]),
    ("pdx.masks", ["pdx.models", "pdx.kernels_pallas", "pdx.decoding", "pdx.io", "pdx.model"]),
    ("pdx.ssm", ["pdx.models", "pdx.decoding", "pdx.io", "pdx.model", "pdx.train", "pdx.cli"]),
    ("pdx.models", ["pdx.decoding", "pdx.io", "pdx.model", "pdx.train", "pdx.cli"]),
    ("pdx.io", ["pdx.decoding", "pdx.model", "pdx.train", "pdx.cli"]),
    ("pdx.decoding", ["pdx.model", "pdx.io", "pdx.train", "pdx.cli", *sorted(FAMILIES)]),
    ("pdx.serve", ["pdx.train", "pdx.cli", "pdx.io", *sorted(FAMILIES)]),  # models through the protocol
]


def violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs that break a rule, families importing each other included."""
    bad = [(m, i) for importer, forbidden in RULES for m, deps in graph.items() if _under(m, importer)
           for i in deps if any(_under(i, f) for f in forbidden)]
    bad += [(f, i) for f in FAMILIES for i in graph.get(f, ()) if i in FAMILIES]
    return sorted(set(bad))


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d in graph and d not in state:
                found = visit(d, stack + [d])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_no_import_against_the_layers():
    assert violations(GRAPH) == []


def test_no_import_cycle():
    assert cycle(GRAPH) is None


def test_the_checks_catch_what_they_are_for():
    assert "pdx.masks" in GRAPH["pdx.kernels_pallas._core"]  # the graph resolves `from pkg import mod`
    assert violations({"pdx.kernels_pallas.attend": {"pdx.models.layers"},
                       "pdx.models.mamba2": {"pdx.models.transformer"},
                       "pdx.decoding.speculative.strategies": {"pdx.model"}}) == [
        ("pdx.decoding.speculative.strategies", "pdx.model"), ("pdx.kernels_pallas.attend", "pdx.models.layers"),
        ("pdx.models.mamba2", "pdx.models.transformer")]
    assert cycle({"pdx.model": {"pdx.io.orbax_checkpoint"}, "pdx.io.orbax_checkpoint": {"pdx.model"}}) == [
        "pdx.io.orbax_checkpoint", "pdx.model", "pdx.io.orbax_checkpoint"]
