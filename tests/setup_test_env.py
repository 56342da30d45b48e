"""Installs what the test suite needs beyond Python packages (run by `make test` before pytest).

Idempotent and quiet when everything is already there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys


def ensure_apt_packages(packages: dict[str, str]) -> None:
    """`packages` maps an executable to the Debian package that provides it."""
    missing = [pkg for exe, pkg in packages.items() if shutil.which(exe) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        sys.exit(f"tests need {', '.join(missing)}; install them with your system's package manager")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True)


def main() -> None:
    ensure_apt_packages({"chromium": "chromium"})


if __name__ == "__main__":
    main()
