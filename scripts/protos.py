"""Regenerate ``generated/`` from ``protos/`` (or, with ``--check``, fail when it is stale).

Runs ``grpc_tools.protoc`` with the message code, its ``.pyi`` stubs, the gRPC stubs and
mypy-protobuf's typed gRPC stubs, then adds the ``__init__.py`` files that make
``generated/mediatag`` an ordinary package.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "generated"


def generate(out: Path) -> None:
    """Write the generated code for every proto under ``protos/`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    plugin = Path(sysconfig.get_path("scripts")) / "protoc-gen-mypy_grpc"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--plugin=protoc-gen-mypy_grpc={plugin}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_grpc_out={out}",
            *sources,
        ],
        check=True,
        cwd=PROTOS,
    )
    for package_dir in [p for p in out.rglob("*") if p.is_dir()]:
        (package_dir / "__init__.py").touch()


def differences(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ between two generated trees."""
    found: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: Path) -> None:
        found.extend(str(prefix / name) for name in cmp.left_only + cmp.right_only)
        found.extend(str(prefix / name) for name in cmp.diff_files + cmp.funny_files)
        for name, sub in cmp.subdirs.items():
            walk(sub, prefix / name)

    walk(filecmp.dircmp(expected, actual, ignore=["__pycache__"]), Path())
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(GENERATED / "mediatag", ignore_errors=True)
        generate(GENERATED)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = differences(Path(tmp), GENERATED)
    if stale:
        print("generated/ is stale; run `make proto`. Differs:", *stale, sep="\n  ")
        return 1
    print("generated/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
