"""The cloud side's tree keeps its import rules (docs/architecture.md, the cloud side's tree).

Read from the source, every import counted (inside functions and under TYPE_CHECKING too), so
nothing is imported and the check takes milliseconds."""

from __future__ import annotations

import ast
from pathlib import Path

import cloud_trainer

ROOT = Path(cloud_trainer.__file__).parent
PARTS = ("training", "releases", "fleet", "samples", "cli", "demo")


def _module_name(path: Path) -> str:
    parts = ["cloud_trainer", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The cloud_trainer modules (and packages) ``name`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in MODULES}


def _part(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 2 or (len(pieces) == 2 and pieces[1] in PARTS) else None


def test_the_tree_has_its_parts() -> None:
    assert {_part(m) for m in MODULES} - {None} == set(PARTS)
    assert (ROOT / "training" / "data" / "voice_commands.csv").is_file()
    assert (ROOT / "fleet" / "dashboard" / "static" / "index.html").is_file()


def test_only_the_demo_command_imports_the_demo() -> None:
    importers = {name for name in MODULES if _part(name) != "demo" and any(_part(m) == "demo" for m in _imports(name))}
    assert importers == {"cloud_trainer.cli.demo"}


def test_releases_imports_no_other_part() -> None:
    reaches = {
        (name, m)
        for name in MODULES
        if _part(name) == "releases"
        for m in _imports(name)
        if _part(m) not in (None, "releases")
    }
    assert not reaches


def test_cli_modules_import_one_way() -> None:
    """Command modules never import the parser (``cloud_trainer.cli``), and no CLI modules import
    each other in a circle (before: cli.py -> cli_deploy.py -> cli.py)."""
    cli = {name for name in MODULES if _part(name) == "cli"}
    graph = {name: {m for m in _imports(name) if m in cli and m != name} for name in cli}
    assert not {name for name, targets in graph.items() if "cloud_trainer.cli" in targets}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for target in graph[name]:
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
