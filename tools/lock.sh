#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the exact versions CI and the README's installs use:
#
#   tools/lock.sh              # add what pyproject.toml gained, keep the other pins
#   tools/lock.sh --upgrade    # move every pin to the newest release the bounds allow
#   tools/lock.sh --upgrade-package claude-agent-sdk
#
# It resolves pyproject.toml's dependencies with the `test`, `postgres` and `otel` extras
# (pip-tools, in a throwaway venv) for this machine's Python. The file is a pip
# constraints file: `pip install -c requirements/lock.txt -e '.[test]'` (see .ci/run).
# Run the suite after an upgrade; tools/check-newest.sh shows what the newest
# releases would break without touching the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q pip-tools
# Constraints files take no extras and no index options: strip and leave them out.
"$tmp/venv/bin/pip-compile" --quiet --extra test --extra postgres --extra otel --strip-extras \
  --allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --output-file requirements/lock.txt "$@" pyproject.toml
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) pins"
