"""The install is complete: every module of the package imports, and so does every module any of
them imports later, inside a function (plots, TensorBoard). Run in CI's fresh virtual environment,
a dependency missing from pyproject.toml fails here with its name."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
import tomllib
from pathlib import Path

import pytest

import colossus
from conftest import REPO

PACKAGE = Path(colossus.__file__).parent


def package_modules() -> list[str]:
    """Every module under colossus/ but the `python -m` entry points (importing one runs the CLI)."""
    found = pkgutil.walk_packages([str(PACKAGE)], prefix="colossus.")
    return sorted(info.name for info in found if not info.name.endswith(".__main__"))


def imported_elsewhere() -> set[str]:
    """Every module named by an import statement anywhere under colossus/, outside the package and
    the standard library: the ones a function imports only when it runs, too."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return {name for name in names if name.split(".")[0] not in sys.stdlib_module_names | {"colossus", "__future__"}}


@pytest.mark.parametrize("module", package_modules())
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_every_third_party_import_is_installed_and_declared() -> None:
    needed = imported_elsewhere()
    assert {"torch", "numpy", "matplotlib", "rich"} <= {name.split(".")[0] for name in needed}  # the scan sees them
    for name in sorted(needed):
        importlib.import_module(name)  # ModuleNotFoundError names what the install lacks
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    distributions = {requirement.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_")
                     for requirement in declared}
    # torch.utils.tensorboard needs the tensorboard distribution; the others carry their module's name.
    top_level = {name.split(".")[0] for name in needed} | ({"tensorboard"} if "torch.utils.tensorboard" in needed else set())
    assert top_level <= distributions, f"imported but not in pyproject.toml dependencies: {sorted(top_level - distributions)}"


def module_imports() -> dict[str, set[str]]:
    """colossus module -> the colossus modules it imports at its top level (what runs on import)."""
    paths = {("colossus." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
             for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.parse(path.read_text()).body:  # top level only: imports inside functions are lazy
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("colossus"):
                for alias in node.names:  # `from colossus.models import rng` imports the module colossus.models.rng
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if submodule in paths else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("colossus"))
        graph[name] = found
    return graph


def test_no_import_cycles() -> None:
    graph = module_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done or module not in graph:
            return
        for imported in graph[module]:
            visit(imported, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_the_model_file_imports_only_torch_and_the_model_description() -> None:
    """models/grok.py reads in one sitting: torch, the model's config and math, its MoE layer; nothing of
    parallelism, training or accounting (those wrap the model from outside)."""
    graph = module_imports()
    assert graph["colossus.models.grok"] <= {"colossus.modelconfig", "colossus.modelmath", "colossus.models.moe",
                                             "colossus.models.rng"}
    assert graph["colossus.models.moe"] <= {"colossus.modelconfig"}


def test_the_catalog_sits_below_train_and_plan() -> None:
    """The GPU catalog is colossus.hardware, which imports neither; the trainer asks the planner only for
    its figures of the run: the prediction (train/prediction.py) and the dry run's (train/dry_run.py)."""
    graph = module_imports()
    assert not any(m.startswith(("colossus.train", "colossus.plan")) for m in graph["colossus.hardware"])
    train_uses_plan = {name for name, imported in graph.items() if name.startswith("colossus.train")
                       and any(m.startswith("colossus.plan") for m in imported)}
    assert train_uses_plan == {"colossus.train.prediction", "colossus.train.dry_run"}
