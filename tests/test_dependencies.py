"""Every third-party module the code imports is a declared dependency (setup.cfg), so a fresh virtual
environment installed as the README says has all of them: the machine the code is written on cannot hide one."""
from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Modules that third-party code imports on our behalf at run time, so no ``import`` of ours names them:
# onnxruntime.quantization.quant_pre_process (``--precision int8``) needs sympy for symbolic shape inference,
# and onnxruntime no longer depends on it (1.32).
RUN_TIME_IMPORTS = {"sympy": "install_requires"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(lines: str) -> set[str]:
    names = set()
    for line in lines.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_canonical(re.match(r"[A-Za-z0-9_.\-]+", line).group(0)))
    return names


def _declared() -> dict[str, set[str]]:
    """{"install_requires": names, "<extra>": names, ...} from setup.cfg."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    declared = {"install_requires": _requirement_names(config["options"]["install_requires"])}
    for extra, lines in config["options.extras_require"].items():
        declared[extra] = _requirement_names(lines)
    return declared


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level) for each absolute import in ``path``; imports inside
    functions or under ``if TYPE_CHECKING:`` are not module level."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            level = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                level = False
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], level))
            visit(child, level)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


def _third_party(name: str) -> bool:
    return name not in sys.stdlib_module_names and name not in ("cxr_transfer", "__future__", "testkit")


def test_every_imported_module_is_declared_in_setup_cfg(project_python_files: list[Path]):
    """Library modules may import install_requires and (lazily) any extra; tests may import install_requires and
    the `test` extra; benchmarks anything declared. Each import name is mapped to the distribution that
    provides it in the running environment."""
    declared = _declared()
    everything = set().union(*declared.values())
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in project_python_files:
        where = path.relative_to(ROOT).parts[0]
        allowed = {"tests": declared["install_requires"] | declared["test"], "benchmarks": everything}.get(
            where, everything)
        for name, module_level in _imports(path):
            if not _third_party(name):
                continue
            dists = {_canonical(d) for d in providers.get(name, [])}
            if not dists:
                problems.append(f"{path.relative_to(ROOT)}: imports {name!r}, which no installed distribution "
                                f"provides")
            elif not dists & allowed:
                problems.append(f"{path.relative_to(ROOT)}: imports {name!r} (from {sorted(dists)}), not declared "
                                f"for {where}")
            elif where not in ("tests", "benchmarks") and module_level and not dists & declared["install_requires"]:
                problems.append(f"{path.relative_to(ROOT)}: imports the optional {name!r} at module level; import "
                                f"it inside the function that needs it")
    assert not problems, "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("module, section", sorted(RUN_TIME_IMPORTS.items()))
def test_run_time_imports_of_other_packages_are_declared_and_installed(module: str, section: str):
    assert module in _declared()[section]
    assert importlib.util.find_spec(module) is not None


def test_the_scan_sees_imports_and_their_level(tmp_path: Path):
    """The scanner itself: a function-level import is lazy, a TYPE_CHECKING one too, a top-level one is not."""
    source = tmp_path / "m.py"
    source.write_text("import numpy as np\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n"
                      "def f():\n    import mapie.regression\n    from sklearn import svm\n")
    assert _imports(source) == [("numpy", True), ("typing", True), ("ray", False), ("mapie", False),
                                ("sklearn", False)]
