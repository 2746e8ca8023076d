"""`pip install .` (a wheel) and `pip install -e .` both give protoknn_plugin.adapters,
and the wheel has no top-level `adapters` package (an unrelated PyPI project owns that name)."""
import subprocess
import sys
import zipfile
from pathlib import Path

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
