"""The wheel ships the kernels as selfee_fast.kernels and installs no top-level `kernels`."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        cwd=out,
    )
    (built,) = out.glob("selfee_fast-*.whl")
    return built


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("logprobs_forward", "logprobs_backward", "spa_loss", "config"):
        assert f"selfee_fast/kernels/{module}.py" in names
    assert not any(name.startswith("kernels/") for name in names), "a top-level 'kernels' package must not ship"
    assert any(name.endswith("entry_points.txt") for name in names)


def test_installed_wheel_imports_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import selfee_fast, selfee_fast.kernels.logprobs_forward as f; "
        f"assert selfee_fast.__file__.startswith({str(target)!r}), selfee_fast.__file__; "
        f"assert f.__file__.startswith({str(target)!r}), f.__file__; print('ok')"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_editable_install_resolves_kernels():
    import selfee_fast.kernels.spa_loss as module

    assert Path(module.__file__).resolve().parent.name == "kernels"
