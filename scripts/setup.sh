#!/usr/bin/env bash
# One-shot, idempotent set-up of the daert environment on a fresh Debian/Ubuntu machine (CPU or CUDA).
#   - Debian text corpora used by the corpus loader, and redis-server for the cache tests (as root with apt-get)
#   - a virtual environment in $DAERT_VENV (default: .venv in the repo)
#   - torch==2.13.0 FIRST, then the project with the research, serve and dev extras under constraints.txt
# Re-running is cheap: each step is skipped when its stamp matches the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DAERT_VENV:-.venv}"
PY="${PYTHON:-python3}"

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    missing=()
    for p in dict-gcide dict-jargon dict-devil fortunes redis-server; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "[setup] installing Debian packages (text corpora, redis-server for the cache tests): ${missing[*]}"
        apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    echo "[setup] not root or no apt-get: skipping Debian packages (dict-gcide dict-jargon dict-devil fortunes redis-server)"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

stamp="$VENV/.daert-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] environment up to date ($VENV)"
    exit 0
fi

"$VPY" -m pip install -q --upgrade pip
echo "[setup] installing torch==2.13.0 first (a looser spec would pull a multi-GB CUDA build)"
"$VPY" -m pip install -q torch==2.13.0
echo "[setup] installing daert with the research, serve and dev extras (constraints.txt)"
"$VPY" -m pip install -q -c constraints.txt -e ".[research,serve,dev]"
echo "$want" > "$stamp"
echo "[setup] done: $VPY"
