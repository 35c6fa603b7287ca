#!/usr/bin/env bash
# Regenerate requirements.lock: every package sstl needs (pyproject's dependencies + the dev and imagenet extras),
# pinned, with the sha256 of each of its files, for CPython 3.11 on Linux x86_64 (resolve with that interpreter).
# Pins already in the lock are kept; to move some, pass pip-compile's options, e.g.
#   scripts/lock.sh -P torch==2.15.0 -P torchvision==0.30.0    # torch and torchvision move together
#   scripts/lock.sh --upgrade                                  # everything to the newest pyproject allows
# pip-tools runs from its own venv (outside the repo), so the lock never depends on what the project venv holds.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "lock.sh: resolve with CPython 3.11 (set PYTHON=python3.11)" >&2
    exit 2
}
tools=${LOCK_TOOLS_VENV:-${TMPDIR:-/tmp}/sstl-lock-tools}
[[ -x $tools/bin/pip-compile ]] || { "$python" -m venv "$tools" && "$tools/bin/pip" install -q pip-tools==7.6.2; }

CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
    --extra dev --extra imagenet --no-emit-index-url --no-emit-find-links \
    --output-file requirements.lock "$@" pyproject.toml
