"""Fetch the prebuilt OHIF Viewer from the npm registry into ``.cache/ohif-<version>/dist`` (once).

``npm pack @ohif/app@<version>`` downloads the package tarball, which ships the
built single-page app under ``package/dist/``. Nothing else is downloaded, and
nothing is fetched again when the dist folder is already there.

    python -m tests.browser.fetch_ohif          # or: make ohif
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OHIF_VERSION = "3.13.2"
REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"


def ohif_dir(version: str = OHIF_VERSION) -> Path:
    return CACHE / f"ohif-{version}"


def ohif_dist(version: str = OHIF_VERSION) -> Path:
    """Where the built viewer lies (its ``index.html`` at the top)."""
    return ohif_dir(version) / "dist"


def have_ohif(version: str = OHIF_VERSION) -> bool:
    return (ohif_dist(version) / "index.html").is_file()


def fetch(version: str = OHIF_VERSION, npm: str | None = None) -> Path:
    """The dist folder of ``@ohif/app@version``, packed by npm and extracted if not there yet."""
    dist = ohif_dist(version)
    if have_ohif(version):
        return dist
    npm = npm or shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: install Node.js (with npm) to fetch the OHIF Viewer")
    target = ohif_dir(version)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        subprocess.run([npm, "pack", f"@ohif/app@{version}", "--pack-destination", tmp, "--silent"],
                       check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"npm pack left {len(tarballs)} tarballs in {tmp}")
        staging = Path(tmp) / "x"
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(staging, members=members, filter="data")
        if not (staging / "package" / "dist" / "index.html").is_file():
            raise RuntimeError(f"@ohif/app@{version} has no package/dist/index.html")
        shutil.rmtree(dist, ignore_errors=True)
        (staging / "package" / "dist").rename(dist)  # same file system: the folder appears whole or not at all
    return dist


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default=OHIF_VERSION)
    args = p.parse_args(argv)
    try:
        print(fetch(args.version))
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"fetch_ohif: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
