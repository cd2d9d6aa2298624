"""The Node.js packages the wire-format tests use (amqplib, @asyncapi/parser), installed from the
npm registry into a cache directory outside the work tree, once per lockfile.

`python3 tests/integration/nodejs.py` installs them (CI runs it before the tests); the tests
install them too when missing. Where: `$AMQTASK_NODE_CACHE`, else `~/.cache/amqtask-tests`, in a
directory named after the lockfile's hash, so a changed lockfile installs afresh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "node"
CLIENT = HERE / "client.cjs"
_FILES = ("package.json", "package-lock.json")


class NodeMissing(RuntimeError):
    """Node.js, npm or the packages cannot be had: the message says what to do."""


def cache_dir() -> Path:
    key = hashlib.sha256(b"".join((HERE / name).read_bytes() for name in _FILES)).hexdigest()
    base = os.environ.get("AMQTASK_NODE_CACHE") or str(Path.home() / ".cache" / "amqtask-tests")
    return Path(base) / f"node-{key[:16]}"


def node() -> str:
    found = shutil.which("node")
    if found is None:
        raise NodeMissing("Node.js is not installed (the wire-format tests need `node`, 18+)")
    return found


def node_modules() -> Path:
    """The installed packages' `node_modules`, installing them first if needed (`npm ci`).

    Raises `NodeMissing` when npm is absent or the install fails (no network, say).
    """
    target = cache_dir()
    modules = target / "node_modules"
    done = modules / ".amqtask-complete"
    if done.exists():
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise NodeMissing("npm is not installed: it installs the wire-format tests' packages")
    target.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        shutil.copyfile(HERE / name, target / name)
    try:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
            cwd=target,
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", "") or ""
        raise NodeMissing(
            f"`npm ci` of {HERE}/package.json into {target} failed: {output.strip()[-2000:]} "
            "(is the npm registry reachable? run `python3 tests/integration/nodejs.py`)"
        ) from None
    done.touch()
    return modules


if __name__ == "__main__":
    try:
        print(f"Node.js packages for the wire-format tests: {node_modules()}")
    except NodeMissing as exc:
        sys.exit(f"error: {exc}")
