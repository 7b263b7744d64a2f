"""The package rules the design rests on, checked on the source rather than trusted.

- `shared/` imports neither `worker/` nor `pipelines/`, and those two never import each other.
- No import cycle between twinq modules (imports inside functions count too; those under
  `if TYPE_CHECKING:` never run, and are left out).
- Only `shared/queue.py` calls Redis: another transport then means one new module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "worker", "pipelines")


def _imports(*, runtime_only: bool = False) -> dict[str, set[str]]:
    """twinq module -> the twinq modules it imports (anywhere in the file; with
    `runtime_only`, not under `if TYPE_CHECKING:`)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = f"twinq.{package}" + ("" if path.stem == "__init__" else f".{path.stem}")
            found: set[str] = set()
            tree = ast.parse(path.read_text())
            typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                           and ast.unparse(block.test) == "TYPE_CHECKING"
                           for n in ast.walk(block)}
            for node in ast.walk(tree):
                if runtime_only and id(node) in typing_only:
                    continue
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twinq."):
                    found.add(node.module or "")
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.startswith("twinq."))
            graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_layers_import_only_downwards() -> None:
    allowed = {"shared": {"shared"}, "worker": {"shared", "worker"},
               "pipelines": {"shared", "pipelines"}}
    wrong = [(m, d) for m, deps in _imports().items() for d in deps
             if d.split(".")[1] not in allowed[m.split(".")[1]]]
    assert not wrong


def test_no_import_cycles() -> None:
    graph = _imports(runtime_only=True)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [module, dep])
            elif dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles


REDIS_CALL = re.compile(r"\.(xadd|xreadgroup|xack|xautoclaim|xlen|xinfo_\w+|xgroup_\w+|xpending\w*"
                        r"|xtrim|evalsha|hset|hgetall|expire|blpop|lpush|register_script|mget)\(")


def test_only_the_queue_module_calls_redis() -> None:
    callers = [f"{path.relative_to(ROOT)}:{n}" for package in PACKAGES
               for path in (ROOT / package).glob("*.py") if path.name != "queue.py"
               for n, line in enumerate(path.read_text().splitlines(), 1)
               if REDIS_CALL.search(line)]
    assert not callers
