"""The installed package: one import name, a console script, package data, a library API without side effects."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cxr_transfer
from cxr_transfer.core.errors import CxrError

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _source_copy(dest: Path) -> Path:
    """The committed files of the checkout (what a clean clone holds), copied to dest."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, env=ENV)
    (found,) = out.glob("cxr_transfer-*.whl")
    return found


def test_wheel_installs_one_import_name_with_the_sample_as_package_data(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["cxr_transfer"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"cxr_transfer"}
    for module in ("__init__.py", "api.py", "cli.py", "extract/pipeline.py", "classify/compare.py",
                   "finetune/train.py", "audit/run.py", "core/settings.py"):
        assert f"cxr_transfer/{module}" in names
    assert sum(n.startswith("cxr_transfer/data/sample/") and n.endswith((".jpg", ".jpeg", ".png")) for n in names) == 24
    assert not [n for n in names if n.startswith(("cxr_transfer/tests/", "cxr_transfer/benchmarks/"))]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cxr-transfer = cxr_transfer.cli:main" in entry_points


def test_regular_install_runs_from_another_directory(wheel: Path, tmp_path: Path):
    """pip install (not editable) into a fresh venv; the console script, the API and the bundled sample work
    from a folder that has nothing of the checkout beside it. The venv's dependencies come from the environment
    running the tests (a .pth naming its site-packages), never from packages installed system-wide."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    nested_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))   # ordered, no repeats
    Path(nested_site, "running-environment.pth").write_text("".join(f"{path}\n" for path in ours))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, env=ENV)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in ENV.items() if k not in ("CXR_DATA", "CXR_WEIGHTS_DIR", "PYTHONPATH")}
    script = env_dir / "bin" / "cxr-transfer"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=elsewhere, capture_output=True, text=True, env=env,
                              timeout=600)

    where = run(python, "-c", "import cxr_transfer as c; print(c.__file__); print(c.embed_folder)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.startswith(str(env_dir)) and "function embed_folder" in where.stdout
    assert run(script, "--help").returncode == 0
    table = run(script, "backbones")
    assert table.returncode == 0 and len(re.findall(r"^(vgg16|xception|nasnetlarge) ", table.stdout, re.M)) == 3
    compared = run(script, "compare", "--backbone", "mobilenetv2", "--random-weights", "--input-size", "32",
                   "--heads", "logreg", "--seeds", "2", "--no-progress")
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "sample" in (elsewhere / "runs").iterdir().__next__().joinpath("record.json").read_text()


def test_import_has_no_global_side_effects():
    """``import cxr_transfer`` loads no deep-learning framework and changes nothing global; importing every
    module of the package (third-party libraries already loaded, their own import effects aside) changes no
    Pillow limit, warning filter, environment variable or matplotlib backend either."""
    script = """
import importlib, json, os, pkgutil, sys, warnings
import numpy, PIL.Image   # numpy adds its own warning filters when first imported
snapshot = lambda: (PIL.Image.MAX_IMAGE_PIXELS, list(warnings.filters), dict(os.environ))
before = snapshot()
import cxr_transfer
light = {"same": snapshot() == before, "heavy": [m for m in ("tensorflow", "keras", "tf2onnx", "onnxruntime",
                                                        "sklearn", "matplotlib") if m in sys.modules]}
for name in ("numpy", "scipy", "sklearn", "sklearn.ensemble", "h5py", "cv2", "imagehash", "onnx", "onnxruntime",
             "tensorflow", "keras", "tf2onnx", "matplotlib", "matplotlib.figure", "joblib", "tqdm"):
    importlib.import_module(name)
import matplotlib
backend = matplotlib.rcParams["backend"]
before = snapshot()
for module in pkgutil.walk_packages(cxr_transfer.__path__, "cxr_transfer."):
    if module.name != "cxr_transfer.__main__":
        importlib.import_module(module.name)
print(json.dumps({**light, "all_same": snapshot() == before and matplotlib.rcParams["backend"] == backend}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == '{"same": true, "heavy": [], "all_same": true}'


def test_public_api_is_exported_and_no_function_shares_a_subpackage_name():
    import cxr_transfer.audit.run  # noqa: F401 - binds the subpackage to cxr_transfer.audit
    import cxr_transfer.finetune.train  # noqa: F401

    for name in ("embed_folder", "embed_images", "compare", "finetune_backbone", "audit_dataset", "explain_images",
                 "predict", "validate", "export_embeddings", "list_backbones", "BackboneSettings", "CxrError"):
        assert name in cxr_transfer.__all__ and callable(getattr(cxr_transfer, name))
    packages = {p.name for p in Path(cxr_transfer.__file__).parent.iterdir() if (p / "__init__.py").is_file()}
    assert not packages & set(cxr_transfer.__all__)   # a function named like a package would be replaced on import
    assert not callable(cxr_transfer.audit) and not callable(cxr_transfer.finetune)   # plain modules
    assert [c.name for c in cxr_transfer.list_backbones()][:2] == ["vgg16", "vgg19"]
    assert issubclass(CxrError, ValueError)


def test_library_arguments_are_checked_like_scikit_learn(tmp_path: Path):
    with pytest.raises(TypeError, match="got float64 instead|dtype float64"):
        cxr_transfer.embed_images(np.zeros((1, 8, 8, 3)), "mobilenetv2", random_weights=True)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        cxr_transfer.embed_images(np.zeros((1, 8, 8, 4), np.uint8), "mobilenetv2", random_weights=True)
    with pytest.raises(TypeError, match="unknown setting"):
        cxr_transfer.compare(tmp_path, "vgg16", heads="logreg", protocl="paper")
    with pytest.raises(ValueError, match="unknown backbone"):   # a CxrError, caught as a ValueError
        cxr_transfer.embed_folder(tmp_path, "vgg17")


def test_embed_images_equals_embed_folder_on_the_same_pixels(tmp_path: Path):
    from testkit.synthetic import write_class_tree
    from cxr_transfer.extract.images import read_rgb

    root = write_class_tree(tmp_path / "d", per_class=1, size=40)
    options = dict(random_weights=True, input_size=32, cache_dir=tmp_path / "cache")
    folder = cxr_transfer.embed_folder(root, "mobilenetv2", **options)
    pixels = np.stack([read_rgb(s.path) for s in folder.samples])     # full size: embed_images resizes
    direct = cxr_transfer.embed_images(pixels, "mobilenetv2", **options)
    np.testing.assert_allclose(direct, folder.embeddings, rtol=1e-5, atol=1e-5)
    grey = cxr_transfer.embed_images(pixels[..., 0], "mobilenetv2", **options)   # grey: copied to 3 channels
    np.testing.assert_allclose(grey, direct, rtol=1e-5, atol=1e-5)


def test_readme_library_example_runs(shared_weights: Path):
    """The README's "Library API" block, run as written from the repository root."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Library API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(24, 512)" in done.stdout


def test_tests_do_not_import_each_other_and_nothing_in_the_library_is_named_test(project_python_files: list[Path]):
    for path in TESTS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("tests", "conftest", "test_")), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("tests", "conftest", "test_")) for a in node.names), path.name
    library = [p for p in project_python_files if p.parts[len(ROOT.parts)] not in ("tests", "benchmarks")]
    assert library
    for path in library:
        assert not path.name.startswith("test_"), path
        tree = ast.parse(path.read_text())
        named = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not [n for n in named if n.startswith("test_")], path


def test_no_sys_path_edits_anywhere(project_python_files: list[Path]):
    for path in project_python_files:
        if path == Path(__file__).resolve():
            continue
        assert "sys.path.insert" not in path.read_text() and "sys.path.append" not in path.read_text(), path
