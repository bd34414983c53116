#!/usr/bin/env bash
# Build, on the dev machine, what the GPU scripts run (the GPU machine has no Rust toolchain):
# the release `kiln` binary and the named integration tests' binaries (as test-NAME), stripped,
# in one folder for the device call to carry (default target-carry; keep it under the carry
# limit, 64 MiB — the script prints its size).
#
#   scripts/build-carry.sh [-o DIR] [--features FEATURES] TEST...
#
# TEST is an integration test's file name without .rs (kernels/tests/gpu_decode.rs: gpu_decode);
# the crate is found from the file. --features applies to the tests' crates (e.g. bench).
# Example, the engine's and the flash train attention's checks:
#
#   scripts/build-carry.sh gpu_decode gpu_generation gpu_train gpu_training
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target-carry
features=()
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        -o) dir=$2; shift 2 ;;
        --features) features=(--features "$2"); shift 2 ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$dir"
cargo build --release -p kiln
cp "$target_dir/release/kiln" "$dir/"
for t in "$@"; do
    file=$(find . -mindepth 3 -maxdepth 3 -path "./*/tests/$t.rs" -not -path "./target*" | head -1)
    if [[ -z $file ]]; then
        echo "no integration test named $t in any crate's tests/ folder" >&2
        exit 2
    fi
    crate_dir=$(dirname "$(dirname "$file")")
    pkg=$(sed -n 's/^name = "\(.*\)"/\1/p' "$crate_dir/Cargo.toml" | head -1)
    # the test binary's path, from cargo's own report (not the newest file in deps/)
    exe=$(cargo test --release -p "$pkg" "${features[@]}" --test "$t" --no-run --message-format=json \
        | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
    if [[ -z $exe ]]; then
        echo "cargo built no test binary for $t ($pkg)" >&2
        exit 1
    fi
    cp "$exe" "$dir/test-$t"
done
strip "$dir"/*
du -sh "$dir"
