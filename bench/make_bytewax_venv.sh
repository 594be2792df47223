#!/usr/bin/env bash
# Create an isolated virtualenv holding bytewax 0.21.1 for the baseline benchmark.
# Kept apart from the project venv so bytewax's pinned deps never leak into onceflow.
# Usage: bench/make_bytewax_venv.sh [VENV_DIR]   (default: <repo>/.venv-bytewax)
set -euo pipefail

BYTEWAX_VERSION="0.21.1"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-${repo_root}/.venv-bytewax}"

# Prefer an explicit 3.11 interpreter; bytewax ships per-minor-version wheels.
if [[ -n "${PYTHON:-}" ]]; then
    python="${PYTHON}"
elif command -v python3.11 >/dev/null 2>&1; then
    python="python3.11"
else
    python="python3"
fi

venv_python="${venv_dir}/bin/python"

check_installed() {
    [[ -x "${venv_python}" ]] || return 1
    "${venv_python}" - "${BYTEWAX_VERSION}" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version

import bytewax  # noqa: F401

sys.exit(0 if version("bytewax") == sys.argv[1] else 1)
PY
}

if check_installed; then
    echo "bytewax ${BYTEWAX_VERSION} already present in ${venv_dir}" >&2
    exit 0
fi

if [[ ! -x "${venv_python}" ]]; then
    if ! "${python}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        echo "error: ${python} is not Python 3.11 (set PYTHON=...)" >&2
        exit 1
    fi
    echo "creating venv ${venv_dir} with $(${python} --version)" >&2
    "${python}" -m venv "${venv_dir}"
fi

"${venv_python}" -m pip install --quiet --disable-pip-version-check "bytewax==${BYTEWAX_VERSION}"

if ! check_installed; then
    echo "error: bytewax ${BYTEWAX_VERSION} not importable from ${venv_dir}" >&2
    exit 1
fi
echo "installed bytewax ${BYTEWAX_VERSION} into ${venv_dir}" >&2
