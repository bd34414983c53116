set -u
export OUT=out KILN_CACHE_DIR=out/cache
mkdir -p out
b=target-carry
echo "== 14B guard series"
SHAPE=qwen2.5-14b MOMENTS=bf16 RUNS=2 JOB_TIMEOUT=240 timeout 420 bash scripts/guard-series.sh $b 2>&1 | tail -25
rm -rf out/series-qwen2.5-14b/model
echo "== load bench 7B bf16"
t0=$SECONDS; $b/kiln random-model --shape qwen2.5-7b --format bf16 --out out/m7 > /dev/null 2>&1; echo "written in $((SECONDS-t0)) s"
timeout 150 $b/kiln bench engine --device cuda --load-model out/m7 --load-runs 2 2>&1 | grep -v "╌"
