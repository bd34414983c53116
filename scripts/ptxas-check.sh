#!/usr/bin/env bash
# Registers, spills and stack of every CUDA kernel as ptxas assembles it for sm_90 — no GPU
# needed. NVRTC (what .ci/run installs) compiles each kernel file to PTX; ptxas comes from the
# nvidia-cuda-nvcc pip wheel, fetched once into target/ptxas. A kernel that spills or sits at
# 255 registers is worth a look before it costs device time; static shared memory (bytes) must
# leave room for whatever dynamic shared memory its launcher asks for.
#
#   scripts/ptxas-check.sh [FILTER]    FILTER: only kernels whose name contains it
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
nvrtc_lib="$target_dir/nvrtc/nvidia/cu13/lib"
if [ ! -e "$nvrtc_lib/libnvrtc.so.13" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$target_dir/nvrtc" \
        "nvidia-cuda-nvrtc==13.0.*"
fi
ptxas="$target_dir/ptxas/x/nvidia/cu13/bin/ptxas"
if [ ! -x "$ptxas" ]; then
    mkdir -p "$target_dir/ptxas"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$target_dir/ptxas" \
        "nvidia-cuda-nvcc==13.0.*"
    python3 -m zipfile -e "$target_dir"/ptxas/nvidia_cuda_nvcc-*.whl "$target_dir/ptxas/x"
    chmod +x "$ptxas"
fi
ptx_dir="$target_dir/ptx-dump"
rm -rf "$ptx_dir"
KILN_PTX_DUMP="$ptx_dir" LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test -q -p kiln-kernels --lib every_kernel_compiles_with_nvrtc > /dev/null
printf '%-44s %5s %8s %8s %11s\n' kernel regs spill-st stack static-smem
for f in "$ptx_dir"/*.ptx; do
    "$ptxas" -arch=sm_90 -v "$f" -o /dev/null 2>&1 | awk -v filter="${1:-}" '
        /Compiling entry function/ { name = $7; gsub(/\047/, "", name) }
        /bytes stack frame/ { stack = $1; spill = $5 }
        /Used [0-9]+ registers/ {
            regs = 0; smem = 0
            for (i = 1; i <= NF; i++) {
                if ($i == "Used") regs = $(i + 1)
                if ($i ~ /^smem/) smem = $(i - 2)
            }
            if (filter == "" || index(name, filter))
                printf "%-44s %5s %8s %8s %11s\n", name, regs, spill, stack, smem
        }'
done
