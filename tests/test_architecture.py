"""docs/architecture.md names the function behind every method step: each name must import."""

import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_every_function_in_the_protocol_table_exists():
    names = re.findall(r"`(elbo_t2ialign[\w.]*):([\w.]+)`", DOC.read_text(encoding="utf-8"))
    assert len(names) >= 20  # the table is there and parsed
    for module_name, qualname in names:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)  # AttributeError names the stale entry
        assert callable(obj), f"{module_name}:{qualname} is not a function or class"


PACKAGE = Path(__file__).resolve().parents[1] / "elbo_t2ialign"


def _package_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported elbo_t2ialign module, at module level?) of every import in a file."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elbo_t2ialign"):
            found += [
                (
                    f"{node.module}.{a.name}" if node.module == "elbo_t2ialign" else node.module,
                    id(node) in top,
                )
                for a in node.names
            ]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("elbo_t2ialign")]
    return found


def test_imports_go_one_way():
    """The core imports only the core (plotting is loaded by HeatmapResult.plot when called); the
    models built in code (`tiny/`) import nothing but the core; no other module of the
    library imports the developer tools or the testbed (the explorer page's image picker excepted),
    not even inside a function; the developer tools import neither the experiments nor the entry points."""
    core = list((PACKAGE / "core").rglob("*.py"))
    assert len(core) >= 10
    for path in core:
        for module, _ in _package_imports(path):
            assert module.startswith("elbo_t2ialign.core") or module == "elbo_t2ialign.plotting", (
                path,
                module,
            )
    for path in (PACKAGE / "tiny").rglob("*.py"):
        assert all(
            m.startswith(("elbo_t2ialign.tiny", "elbo_t2ialign.core")) for m, _ in _package_imports(path)
        ), path
    library = [
        p for p in PACKAGE.rglob("*.py") if not {"devtools", "testbed"} & set(p.relative_to(PACKAGE).parts)
    ]
    assert len(library) >= 40
    for path in library:
        # the explorer page, an entry point, offers the testbed world's images in its picker
        app = path.relative_to(PACKAGE).parts[0] == "app"
        banned = ("elbo_t2ialign.devtools",) if app else ("elbo_t2ialign.devtools", "elbo_t2ialign.testbed")
        for module, _ in _package_imports(path):
            assert not module.startswith(banned), (path, module)
    above = ("segmentation", "generation", "segment", "evaluate", "generate", "explain", "grid", "report")
    for path in (PACKAGE / "devtools").rglob("*.py"):
        for module, _ in _package_imports(path):
            assert module.split(".")[1] not in above, (path, module)
