#!/usr/bin/env bash
# Runs a `tessera` binary built on another machine on a CUDA host whose PyTorch 2.11.0 (cu130) is installed
# in the host's Python: the binary's rpath points at the build machine's libtorch, so this puts the host's
# torch `lib` directory on LD_LIBRARY_PATH instead. Usage: deploy/run-on-cuda-host.sh path/to/tessera ARGS...
set -euo pipefail
bin=$1
shift
python=${PYTHON:-python3}
torch_lib=$("$python" -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
version=$("$python" -c 'import torch; print(torch.__version__)')
case "$version" in
    2.11.0*) ;;
    *) echo "run-on-cuda-host: this host's torch is $version; tessera is built for 2.11.0" >&2; exit 2 ;;
esac
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$bin" "$@"
