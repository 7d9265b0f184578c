#!/usr/bin/env bash
# Run the test suite against the newest releases of every dependency, and say what broke.
#
#   tools/check-newest.sh [pytest arguments…]     # e.g. tools/check-newest.sh tests/test_turns.py
#
# It makes a throwaway venv, installs the project with its test extra and NO constraints
# (so pip takes the newest release each bound in pyproject.toml allows), prints every
# package whose version differs from requirements/lock.txt, runs ruff and pytest, and
# ends with the failing tests. Nothing in the tree changes; when all is green,
# `tools/lock.sh --upgrade` moves the lock to those versions.
# Exit status: 0 when everything passed on the newest releases, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
venv="$tmp/venv"
python3 -m venv "$venv"
echo "== installing the newest releases (no lock)"
"$venv/bin/pip" install -q --upgrade pip >"$tmp/pip.log" 2>&1
# pip's warnings (build backends' deprecations…) go to a log, shown if the install fails.
if ! "$venv/bin/pip" install -q --upgrade -e '.[test,postgres]' >>"$tmp/pip.log" 2>&1; then
  tail -30 "$tmp/pip.log"
  echo "BROKEN: the newest releases do not install together (pip's message above)"
  exit 1
fi

echo "== newer than requirements/lock.txt"
"$venv/bin/python" - requirements/lock.txt <<'PY'
import re
import sys
from importlib.metadata import distributions

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

locked = {}
for line in open(sys.argv[1]):
    match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
    if match:
        locked[norm(match.group(1))] = match.group(2)
changed = 0
for dist in sorted(distributions(), key=lambda d: norm(d.metadata["Name"])):
    name = norm(dist.metadata["Name"])
    if name in locked and locked[name] != dist.version:
        print(f"  {name}: {locked[name]} -> {dist.version}")
        changed += 1
print(f"  ({changed} package(s) differ from the lock)" if changed else "  (none: the lock is newest)")
PY

status=0
echo "== ruff"
"$venv/bin/ruff" check . || status=1
echo "== pytest"
"$venv/bin/python" -m pytest -q -rfE -p no:cacheprovider "$@" | tee "$tmp/pytest.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== what broke on the newest releases"
if [ "$status" = 0 ]; then
  echo "  nothing: the suite passes (tools/lock.sh --upgrade takes these versions)"
else
  grep -E '^(FAILED|ERROR) ' "$tmp/pytest.log" | sed 's/^/  /' || true
fi
exit "$status"
