#!/usr/bin/env bash
# Idempotent set-up: libtorch (PyPI torch==2.11.0) in a shared, versioned virtual environment.
#
# The environment lives once per machine under $TESSERA_CACHE (default ~/.cache/tessera), because it is
# 4.6 GB and takes minutes to install: a fresh clone on the same machine links `.venv` to it instead of
# downloading again. Inside it, `libtorch` points at the torch package directory; `.cargo/config.toml`
# hands that path to torch-sys, so plain `cargo build` works with nothing exported by hand.
set -euo pipefail

TORCH_VERSION=2.11.0
# Python-side packages the tests use as references / real peers (all from PyPI).
PY_PACKAGES=(numpy==2.3.5 safetensors==0.8.0 'moto[server]==5.2.5' prometheus_client==0.26.0 transformers==5.24.0)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TESSERA_CACHE:-$HOME/.cache/tessera}
python=${PYTHON:-python3}
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
venv="$cache/venv-torch$TORCH_VERSION-py$pyver"
stamp="$venv/.tessera-ready"

mkdir -p "$cache"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" <(printf '%s\n' "torch==$TORCH_VERSION" "${PY_PACKAGES[@]}"); then
    echo "setup: installing torch==$TORCH_VERSION ${PY_PACKAGES[*]} into $venv (about 2 minutes and 4.6 GB the first time on a machine)"
    # A lock keeps two clones setting up at once from installing into the same environment together.
    exec 9>"$cache/.setup.lock"
    flock 9
    if [ ! -f "$stamp" ] || ! cmp -s "$stamp" <(printf '%s\n' "torch==$TORCH_VERSION" "${PY_PACKAGES[@]}"); then
        [ -x "$venv/bin/python3" ] || "$python" -m venv "$venv"
        "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check \
            "torch==$TORCH_VERSION" "${PY_PACKAGES[@]}"
        ln -sfn "$("$venv/bin/python3" -c 'import torch, os; print(os.path.dirname(torch.__file__))')" "$venv/libtorch"
        printf '%s\n' "torch==$TORCH_VERSION" "${PY_PACKAGES[@]}" > "$stamp"
    fi
    flock -u 9
else
    echo "setup: torch==$TORCH_VERSION already installed in $venv"
fi

# `.venv` in the checkout is a link to the shared environment.
if [ "$(readlink "$root/.venv" 2>/dev/null)" != "$venv" ]; then
    if [ -e "$root/.venv" ] && [ ! -L "$root/.venv" ]; then
        echo "setup: $root/.venv exists and is not a link to $venv; move it away and rerun" >&2
        exit 1
    fi
    ln -sfn "$venv" "$root/.venv"
fi
"$root/.venv/bin/python3" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
echo "setup: ok (.venv -> $venv)"
