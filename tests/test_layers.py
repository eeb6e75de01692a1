"""Every import of the package points down the floors docs/architecture.md names (its "Floors"
table), so the picture cannot drift from the code: an import to a higher floor, or to another unit
of the same floor the table does not allow, fails here with the file and line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vllm_kvcache_plugin"
NAME = PACKAGE.name


def floor_table() -> tuple[dict[str, int], dict[str, set[str]]]:
    """unit -> floor, and unit -> the same-floor units it may import, from docs/architecture.md."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Floors", 1)[1].split("\n## ", 1)[0]
    floors, allowed = {}, {}
    for floor, units, same in re.findall(r"^\| (\d+) \| ([^|]+) \|([^|]*)\|", section, re.M):
        names = [u.strip().strip("`") for u in units.split(",")]
        for unit in names:
            floors[unit] = int(floor)
            allowed[unit] = {u.strip().strip("`") for u in same.split(",") if u.strip()}
    assert floors, "docs/architecture.md has no Floors table"
    return floors, allowed


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def package_imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import of this package in ``path``, functions included; ``module``
    names the file when it is not in the package (the checker's own test)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == NAME]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != NAME:
                continue
            for alias in node.names:  # "from .. import events" imports the module events
                sub = f"{target}.{alias.name}"
                is_module = (REPO / Path(*sub.split(".")).with_suffix(".py")).exists() or \
                    (REPO / Path(*sub.split("."))).is_dir()
                found.append((node.lineno, sub if is_module else target))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_of_the_package_has_a_floor():
    floors, _ = floor_table()
    units = {unit_of(module_name(p)) for p in SOURCES}
    missing = sorted(units - set(floors))
    assert not missing, f"name the floor of {missing} in docs/architecture.md's Floors table"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path):
    floors, allowed = floor_table()
    source = module_name(path)
    here = unit_of(source)
    problems = []
    for line, target in package_imports(path):
        there = unit_of(target)
        if there == here:
            continue
        if floors[there] > floors[here]:
            problems.append(f"{path.relative_to(REPO)}:{line} imports {target} (floor {floors[there]}) "
                            f"from floor {floors[here]}: imports must point down")
        elif floors[there] == floors[here] and there not in allowed[here]:
            problems.append(f"{path.relative_to(REPO)}:{line} imports {target} across floor {floors[here]} "
                            f"({here} -> {there}), which docs/architecture.md does not allow")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_function_level_imports_and_skips_type_checking(tmp_path):
    """The rules above would be toothless if the walk missed imports inside functions."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\n"
                     "from .. import events\n"
                     "if TYPE_CHECKING:\n"
                     "    from ..engine import KVCacheEngine\n"
                     "def later():\n"
                     "    from ..connectors.url import parse_remote_url\n"
                     "    import vllm_kvcache_plugin.settings\n")
    found = [t for _, t in package_imports(probe, f"{NAME}.storage.probe")]
    assert found == [f"{NAME}.events", f"{NAME}.connectors.url", f"{NAME}.settings"]
