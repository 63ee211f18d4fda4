"""Copy the dashboard's chart library from ``node_modules/`` into the package (or, with
``--check``, fail when the copy differs from what the lock file installs).

The web gateway ships its static files in the Python package, so ``pip install`` needs no
npm and the page needs no CDN. uPlot comes from npm at the exact version ``package.json``
and ``package-lock.json`` pin (integrity-checked by ``npm ci``); its built files and licence
are copied to ``web_gateway/static/vendor/`` and committed, and ``make test`` runs this
check, so a version bump in the lock file without ``make vendor`` fails.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "web_gateway" / "static" / "vendor"
# Installed file -> its name in the package.
FILES = {
    ROOT / "node_modules" / "uplot" / "dist" / "uPlot.iife.min.js": "uPlot.iife.min.js",
    ROOT / "node_modules" / "uplot" / "dist" / "uPlot.min.css": "uPlot.min.css",
    ROOT / "node_modules" / "uplot" / "LICENSE": "uPlot.LICENSE",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the copies are stale")
    args = parser.parse_args()
    missing = [str(source) for source in FILES if not source.exists()]
    if missing:
        print("not installed (run `npm ci`):", *missing, sep="\n  ")
        return 1
    if not args.check:
        VENDOR.mkdir(parents=True, exist_ok=True)
        for source, name in FILES.items():
            shutil.copyfile(source, VENDOR / name)
        return 0
    stale = [
        name
        for source, name in FILES.items()
        if not (VENDOR / name).exists() or not filecmp.cmp(source, VENDOR / name, shallow=False)
    ]
    if stale:
        print("web_gateway/static/vendor/ is stale; run `make vendor`. Differs:", *stale)
        return 1
    print("web_gateway/static/vendor/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
