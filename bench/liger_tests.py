"""Run Liger-Kernel's own module tests against selfee_fast's drop-ins, with only the import changed.

    pip download liger-kernel==0.8.5 --no-deps --no-binary :all: -d SDIST && tar xzf SDIST/liger_kernel-*.tar.gz -C SDIST
    python bench/liger_tests.py SDIST/liger_kernel-0.8.5 [pytest arguments, e.g. -k "not 1024"]

Copies the source tree's `test/` folder to a temporary directory, replaces
`from liger_kernel.chunked_loss import LigerFusedLinear<X>Loss` by
`from selfee_fast import FusedLinear<X>Loss as LigerFusedLinear<X>Loss` in the DPO, SimPO,
CPO and ORPO test files (nothing else: the reference implementations, the functional
tests of Liger's own autograd functions and the device line stay Liger's), and runs pytest
on those four files. liger-kernel itself must be importable (the tests use its helpers).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = {"dpo": "DPO", "simpo": "SimPO", "cpo": "CPO", "orpo": "ORPO"}
ROOT = Path(__file__).resolve().parents[1]


def swap_import(source: str, name: str) -> str:
    pattern = rf"^from liger_kernel\.chunked_loss import LigerFusedLinear{name}Loss$"
    swapped, count = re.subn(pattern, f"from selfee_fast import FusedLinear{name}Loss as LigerFusedLinear{name}Loss",
                             source, flags=re.M)  # fmt: skip
    if count != 1:
        raise SystemExit(f"expected one import of LigerFusedLinear{name}Loss, found {count}")
    return swapped


def main(argv: list[str]) -> int:
    if not argv or not (Path(argv[0]) / "test" / "chunked_loss").is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    source_tree, pytest_args = Path(argv[0]), argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(source_tree / "test", Path(tmp) / "test")
        files = []
        for stem, name in CLASSES.items():
            path = Path(tmp) / "test" / "chunked_loss" / f"test_{stem}_loss.py"
            path.write_text(swap_import(path.read_text(), name))
            files.append(str(path.relative_to(tmp)))
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", "-rf"]
        return subprocess.run([*command, *files, *pytest_args], cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
