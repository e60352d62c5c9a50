"""The package's modules form no import cycle, and each one imports on its own.

A cycle between two modules works or fails depending on which of them a program imports first, so it is checked
two ways: statically, on every `import` statement of the package (top-level or inside a function), and by
importing each module first, in an interpreter where no module of prg_hub is loaded yet, then the rest, in both
orders.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import prg_hub

PACKAGE_DIR = Path(prg_hub.__file__).parent


def package_modules() -> dict[str, Path]:
    """{dotted module name: source file} for every module of prg_hub, subpackages included."""
    modules = {"prg_hub": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="prg_hub."):
        folder = PACKAGE_DIR.joinpath(*info.name.split(".")[1:])
        modules[info.name] = folder / "__init__.py" if info.ispkg else folder.with_suffix(".py")
    return modules


def imported_package_modules(name: str, source: Path, known: set[str]) -> set[str]:
    """The prg_hub modules that module `name` imports anywhere in its source (relative imports resolved)."""
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from . import x` and `from .pkg import x` may name submodules as well as attributes.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def modules_needing(library: str, modules: dict[str, Path]) -> set[str]:
    """The prg_hub modules that import `library`, themselves or through other prg_hub modules."""
    graph = {name: imported_package_modules(name, source, set(modules)) for name, source in modules.items()}
    needing = set()
    for name, source in modules.items():
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            imported = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(target and target.split(".")[0] == library for target in imported):
                needing.add(name)
    while grown := {name for name, targets in graph.items() if targets & needing and name not in needing}:
        needing |= grown
    return needing


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, …, a], or None if the graph is acyclic (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    # A package's __init__ imports its submodules and every submodule implicitly runs its package's __init__
    # first; only the edges written in the source count.
    graph = {name: imported_package_modules(name, source, set(modules)) for name, source in modules.items()}
    assert graph.get("prg_hub.modeling_prg"), "the analysis found no imports"
    cycle = find_cycle({name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Run in a fresh interpreter: load the third-party libraries once (transformers and diffusers load their classes on
# first use, so those are touched too), then fork a child per module, which imports that module first (none of
# prg_hub is loaded yet in the child), then every other module in the given order. Two children run at a time.
IMPORT_EACH_FIRST = """
import importlib, importlib.util, os, sys, traceback
import accelerate, datasets, diffusers, huggingface_hub, safetensors.torch, scipy.optimize, torch, torchdiffeq
import transformers
if importlib.util.find_spec("torchvision"):
    import torchvision.transforms.v2
transformers.PreTrainedModel, transformers.pipelines.Pipeline, transformers.AutoImageProcessor
diffusers.UNet2DModel, diffusers.DiTTransformer2DModel, diffusers.training_utils.EMAModel
order = sys.argv[1:]
running, failures = set(), 0
for first in order:
    if len(running) == 2:
        pid, status = os.wait()
        running.discard(pid)
        failures += status != 0
    pid = os.fork()
    if pid == 0:
        try:
            for name in [first, *(n for n in order if n != first)]:
                importlib.import_module(name)
        except BaseException:
            print(f"importing {first} first failed:", file=sys.stderr)
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    running.add(pid)
for pid in running:
    failures += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failures else 0)
"""


def test_only_the_training_augmentation_needs_torchvision():
    assert modules_needing("torchvision", package_modules()) == {"prg_hub.augment"}


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_each_module_imports_first_in_a_fresh_interpreter(order):
    """Every module (without torchvision, those that need it are left out: they come with prg_hub[train])."""
    modules = package_modules()
    if importlib.util.find_spec("torchvision") is None:
        modules = {name: path for name, path in modules.items() if name not in modules_needing("torchvision", modules)}
    names = sorted(modules, reverse=order == "reversed")
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, *names], check=False, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
