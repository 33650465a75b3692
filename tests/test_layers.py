"""The package's layers (setup.cfg's import-linter contract): a folder imports only the folders below it.

    core < extract < classify < audit | finetune < explain < validation < deploy < tracking < api < cli

The contract is checked on this checkout, and shown to fail on a copy with one upward import added, so that
a passing check means something. Imports inside functions and under TYPE_CHECKING count like any other.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["cli", "api", "tracking", "deploy", "validation", "explain", "audit|finetune", "classify", "extract",
          "core"]


def _lint(root: Path, cwd: Path, python_path: Path | None = None) -> subprocess.CompletedProcess:
    """lint-imports with the setup.cfg of ``root``, in a fresh process (grimp's cache off)."""
    env = {"PYTHONPATH": str(python_path)} if python_path else {}
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(root / 'setup.cfg')!r}, no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_the_layers_contract_holds():
    done = _lint(ROOT, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 kept, 0 broken" in done.stdout


def test_the_contract_fails_on_an_upward_import(tmp_path: Path, project_python_files):
    copy = tmp_path / "cxr_transfer"
    for path in project_python_files + [ROOT / "setup.cfg"]:
        target = copy / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    errors = copy / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from cxr_transfer.classify import heads  # noqa\n")
    done = _lint(copy, tmp_path, python_path=tmp_path)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cxr_transfer.core is not allowed to import cxr_transfer.classify" in done.stdout
    assert "cxr_transfer.core.errors -> cxr_transfer.classify.heads" in done.stdout


def _folder(path: Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_nothing_imports_the_root_package_api_or_cli(project_python_files):
    """The root package re-exports api; cli imports api; nothing else imports any of the three."""
    allowed = {"__init__": {"api"}, "__main__": {"cli"}, "cli": {"api"}}
    library = [p for p in project_python_files if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks")]
    wrong = []
    for path in library:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "cxr_transfer":   # a module, else a root name
                targets = [a.name if (ROOT / a.name).is_dir() or a.name in ("api", "cli") else "" for a in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                targets = [n.split(".")[1] if n.count(".") else "" for n in names if n.split(".")[0] == "cxr_transfer"]
            else:
                continue
            for target in targets:
                if target in ("", "__init__", "api", "cli") and target not in allowed.get(_folder(path), set()):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports cxr_transfer.{target or '(root)'}")
    assert not wrong, wrong


HEAVY = {"cxr_transfer.finetune.layers"}
"""The one module of the package that imports a deep-learning framework (Keras) at its top."""


def test_imports_inside_functions_only_keep_keras_out_and_say_so(project_python_files):
    """Library modules import the package's modules at their top; only ``finetune.layers`` (Keras) is imported
    inside functions, with a comment saying why. api.py, which ``import cxr_transfer`` loads, imports every
    stage inside its function by design (its docstring says so)."""
    wrong = []
    for path in project_python_files:
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", "benchmarks") or relative.name in ("api.py", "__init__.py"):
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for function in ast.walk(ast.parse(text)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                for name in names:
                    if name.startswith("cxr_transfer") and (name not in HEAVY or "Keras" not in lines[node.lineno - 1]):
                        wrong.append(f"{relative}:{node.lineno} {name}")
    assert not wrong, wrong
