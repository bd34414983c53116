# shellcheck shell=bash
# The preamble shared by the GPU scripts that take a folder of prebuilt binaries (gpu-all.sh,
# gpu-engine.sh, gpu-train.sh, gpu-flash-train.sh, ncu-train.sh). Sourced, not run, right after
# the script's own `set -uo pipefail`:
#
#   . "$(dirname "$0")/lib.sh"
#
# It sets `bin`, the binaries' folder (the script's first argument, default target-carry), and
# `out`, the output folder ($OUT, default out/), which it creates; declares `result`, each part's
# exit status by name; and defines `summary`, which prints those statuses and exits. Anything a
# script does its own way stays in that script: KILN_CACHE_DIR (gpu-all.sh leaves it to the
# scripts it runs), and the other scripts' different defaults (gpu-kernels.sh, guard-series.sh,
# gpu-load-check.sh, gpu-agent-check.sh, gpu-exec-check.sh).

# shellcheck disable=SC2034  # bin is for the sourcing script
bin=${1:-target-carry}
out=${OUT:-out}
mkdir -p "$out"
declare -A result

# summary WIDTH PART... — a line per part, its name padded to WIDTH and ${result[PART]}; exits
# with 0 when every part's status is 0, else 1.
summary() {
    local width=$1 k status=0
    shift
    echo
    echo "== summary (exit status of each part; 0 = passed)"
    for k in "$@"; do
        printf '%-*s %s\n' "$width" "$k" "${result[$k]}"
        [[ "${result[$k]}" == 0 ]] || status=1
    done
    exit $status
}
