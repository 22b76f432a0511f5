"""The layering rules, checked on the source: no import circle inside ``labelshift``, ``config`` imports nothing
from ``data/``, the library floor never imports ``labelshift.pipeline``, estimator names live in the registry
only, and the stage table lists the stages the config accepts."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import PROJECT

PACKAGE = PROJECT / "labelshift"
# the job's orchestration and the entry points that may drive it
MAY_IMPORT_PIPELINE = ("labelshift.pipeline", "labelshift.cli", "labelshift.bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every labelshift module -> the labelshift modules it imports (at any depth, lazy imports included)."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labelshift"):
                for alias in node.names:  # `from labelshift.pipeline import steps` imports the submodule
                    candidate = f"{node.module}.{alias.name}"
                    targets.add(candidate if candidate in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("labelshift")}
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package's ``__init__`` importing its own submodules is
    not a cycle (Python executes the package first); the edges from a submodule up to its package are dropped."""
    def edges(module: str) -> set[str]:
        return {t for t in graph[module] if not module.startswith(t + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges(module)):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle_in_the_library():
    assert _cycle(_imports()) is None


def test_config_imports_nothing_from_data():
    graph = _imports()
    config_modules = [module for module in graph if module == "labelshift.config" or module.startswith("labelshift.config.")]
    assert len(config_modules) >= 4
    assert {target for module in config_modules for target in graph[module] if target.startswith("labelshift.data")} == set()


def test_library_floor_never_imports_the_pipeline():
    offenders = {module: sorted(t for t in targets if t.startswith("labelshift.pipeline"))
                 for module, targets in _imports().items() if not module.startswith(MAY_IMPORT_PIPELINE)}
    assert {module: found for module, found in offenders.items() if found} == {}


def test_estimator_names_come_from_the_registry():
    from labelshift.config import PriorConfig
    from labelshift.estimate import ESTIMATORS, IMAGE_METHODS, METHODS, PIXEL_METHODS

    assert METHODS == ("reference", "count", "soft_count", "presence", "em", "bbse", "em_raw", "ensemble")
    assert set(PIXEL_METHODS) | set(IMAGE_METHODS) == set(METHODS) and IMAGE_METHODS == ("reference", "presence")
    assert {name: cls.kind for name, cls in ESTIMATORS.items()}["presence"] == "image"
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py") if "estimate" not in path.parts}
    assert [path.name for path, text in sources.items() if '"soft_count"' in text or "'soft_count'" in text] == []
    assert PriorConfig(method="bbse").method == "bbse"


def test_the_stage_table_lists_the_configurable_stages():
    from labelshift.config import PIPELINE_STAGES
    from labelshift.pipeline.job import ALL_STAGES, STAGE_TABLE

    assert ALL_STAGES == PIPELINE_STAGES
    for stage in STAGE_TABLE.values():
        assert all(ALL_STAGES.index(u) < ALL_STAGES.index(stage.name) for u in stage.upstream)
