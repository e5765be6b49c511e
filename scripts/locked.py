"""Prints the pip requirement line, hashes included, of one package as uv.lock pins it.

scripts/setup.sh installs uv itself this way, before uv can read its own lock:
    python3 scripts/locked.py uv   ->   uv==0.13.9 --hash=sha256:... --hash=sha256:...
"""

import sys
from pathlib import Path

import tomllib

LOCK = Path(__file__).resolve().parent.parent / "uv.lock"


def requirement(name: str) -> str:
    packages = tomllib.loads(LOCK.read_text())["package"]
    matches = [p for p in packages if p["name"] == name]
    if len(matches) != 1:
        raise SystemExit(f"uv.lock pins {len(matches)} versions of {name}; expected exactly one")
    (package,) = matches
    files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
    hashes = " ".join(f"--hash={f['hash']}" for f in files)
    return f"{name}=={package['version']} {hashes}"


if __name__ == "__main__":
    print(requirement(sys.argv[1]))
