# shellcheck shell=bash
# Build environment for sire: a Python virtual environment holding the PyTorch
# wheel whose libtorch `tch` 0.24 builds against (torch==2.11.0).
#
#   source scripts/env.sh
#
# Creates `.venv` in the repository root when it is missing (or `$SIRE_VENV`),
# installs torch==2.11.0 into it when `import torch` fails or finds another
# version (about 4.6 GB with its nvidia-* dependencies), puts the venv first on
# PATH, and exports LIBTORCH_USE_PYTORCH=1 and LD_LIBRARY_PATH with torch's lib
# directory (for test binaries and examples at run time). Safe to source again
# and under `set -euo pipefail`; silent when everything is in place.

_sire_env() {
    local want="2.11.0"
    local root venv py cand torch_lib
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    venv="${SIRE_VENV:-$root/.venv}"

    if [ ! -x "$venv/bin/python" ]; then
        py=""
        for cand in "${PYTHON:-}" python3 python3.13 python3.12 python3.11 python3.10; do
            [ -n "$cand" ] || continue
            command -v "$cand" >/dev/null 2>&1 || continue
            if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
                py="$cand"
                break
            fi
        done
        if [ -z "$py" ]; then
            echo "sire env: need python3 >= 3.10 (set PYTHON=/path/to/python3)" >&2
            return 1
        fi
        echo "sire env: creating $venv with $("$py" --version 2>&1)" >&2
        "$py" -m venv "$venv" || {
            echo "sire env: '$py -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            return 1
        }
    fi

    if ! "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$want' else 1)" >/dev/null 2>&1; then
        echo "sire env: installing torch==$want into $venv (about 4.6 GB)" >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$want" || {
            echo "sire env: pip install torch==$want failed" >&2
            return 1
        }
    fi

    # What `activate` does, without its prompt handling (which is not nounset-safe everywhere).
    export VIRTUAL_ENV="$venv"
    case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
    esac
    unset PYTHONHOME

    export LIBTORCH_USE_PYTORCH=1
    # find_spec: no `import torch` (slow, and it warns when numpy is missing).
    torch_lib="$("$venv/bin/python" -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("torch").submodule_search_locations[0], "lib"))')" || {
        echo "sire env: cannot locate torch's lib directory" >&2
        return 1
    }
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$torch_lib:"*) ;;
        *) export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
}

if ! _sire_env; then
    unset -f _sire_env
    # shellcheck disable=SC2317 # `exit` only when executed instead of sourced
    return 1 2>/dev/null || exit 1
fi
unset -f _sire_env
