#!/usr/bin/env bash
# Install a real Label Studio server (1.23.x from PyPI) for the end-to-end tests, in its OWN venv.
#
# The label-studio server pins older redis, rq and opencv than hih-assist uses, so it must not share the
# project's .venv. The result lives in .e2e/ls-venv (ignored by git); a stamp file makes re-runs instant.
#
# Environment:
#   PY                     python interpreter to build the venv with (default: python3.11, else python3)
#   LABEL_STUDIO_SPEC      pip requirement to install (default: label-studio==1.23.*)
#   HIH_E2E_VENV           venv location (default: <repo>/.e2e/ls-venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HIH_E2E_VENV:-$ROOT/.e2e/ls-venv}"
SPEC="${LABEL_STUDIO_SPEC:-label-studio==1.23.*}"
STAMP="$VENV/.installed"

if [[ -z "${PY:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$SPEC" && -x "$VENV/bin/label-studio" ]]; then
    echo "install_label_studio: $SPEC already in $VENV (stamp $STAMP); nothing to do"
    exit 0
fi

start=$(date +%s)
echo "install_label_studio: creating venv $VENV with $PY"
mkdir -p "$(dirname "$VENV")"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
echo "install_label_studio: upgrading pip"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
echo "install_label_studio: pip install '$SPEC' (a few minutes on a cold cache)"
# Some machines list file:// extra indexes that do not exist; pip warns once per package. Hide only that line.
"$VENV/bin/python" -m pip install -q "$SPEC" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
"$VENV/bin/python" -c 'import label_studio; print("install_label_studio: label-studio", label_studio.__version__)'
echo "$SPEC" > "$STAMP"
echo "install_label_studio: done in $(( $(date +%s) - start )) s; stamp $STAMP"
