#!/usr/bin/env bash
# ruff and mypy over the project. mypy needs the import names (dovecote.bus,
# ...), so it checks a tree of symlinks that mirrors the installed layout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DOVECOTE_VENV:-$here/.venv}"
cd "$here"
"$venv/bin/ruff" check .
tree="$here/.mypy-tree"
rm -rf "$tree" && mkdir -p "$tree/dovecote"
for pkg in bus libs services gateway vmmgr recorder notifier; do
    ln -s "$here/$pkg" "$tree/dovecote/$pkg"
done
touch "$tree/dovecote/__init__.py"
(cd "$tree" && "$venv/bin/mypy" --config-file "$here/pyproject.toml" -p dovecote)
