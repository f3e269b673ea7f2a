#!/usr/bin/env bash
# Prepares the demo corpus from real text already on the machine: the Python standard library's top-level
# modules (source and docstrings, about 4.7 million bytes, so as many tokens) of the project's `.venv` Python. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/data/demo}
tessera=${TESSERA:-$root/target/release/tessera}
if [ -f "$out/index.json" ]; then
    echo "demo corpus: already prepared at $out"
    exit 0
fi
stdlib=$("$root/.venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mapfile -t files < <(find "$stdlib" -maxdepth 1 -name '*.py' -type f | LC_ALL=C sort)
echo "demo corpus: ${#files[@]} modules from $stdlib"
args=()
for f in "${files[@]}"; do args+=(--input "$f"); done
"$tessera" data prepare "${args[@]}" --out "$out" --tokenizer byte --skip-bad
