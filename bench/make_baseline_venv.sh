#!/usr/bin/env bash
# Create an isolated virtualenv holding one baseline engine (bytewax, quixstreams) at a
# pinned version, for the side-by-side benchmarks. Kept apart from the project venv so
# the engine's pinned deps never leak into onceflow.
# Usage: bench/make_baseline_venv.sh PACKAGE VERSION [VENV_DIR]
#   (the package's import name is its distribution name; default dir <repo>/.venv-PACKAGE)
set -euo pipefail

PACKAGE="${1:?usage: make_baseline_venv.sh PACKAGE VERSION [VENV_DIR]}"
VERSION="${2:?usage: make_baseline_venv.sh PACKAGE VERSION [VENV_DIR]}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${3:-${repo_root}/.venv-${PACKAGE}}"

# Prefer an explicit 3.11 interpreter; engines ship per-minor-version wheels.
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
    "${venv_python}" - "${PACKAGE}" "${VERSION}" <<'PY' >/dev/null 2>&1
import importlib
import sys
from importlib.metadata import version

importlib.import_module(sys.argv[1])
sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
PY
}

if check_installed; then
    echo "${PACKAGE} ${VERSION} already present in ${venv_dir}" >&2
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

"${venv_python}" -m pip install --quiet --disable-pip-version-check "${PACKAGE}==${VERSION}"

if ! check_installed; then
    echo "error: ${PACKAGE} ${VERSION} not importable from ${venv_dir}" >&2
    exit 1
fi
echo "installed ${PACKAGE} ${VERSION} into ${venv_dir}" >&2
