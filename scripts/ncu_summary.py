#!/usr/bin/env python3
"""Kernel time per step from an ncu CSV log (`ncu --metrics gpu__time_duration.sum --csv
--log-file FILE ...`): the kernels summed by name, divided by the number of steps the profiled
command ran, largest first. Usage: scripts/ncu_summary.py FILE STEPS [TOP]."""
import csv, sys, collections, re
rows = list(csv.reader(open(sys.argv[1])))
hdr = None
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows:
    if hdr is None:
        if "Kernel Name" in r: hdr = {k: i for i, k in enumerate(r)}
        continue
    if len(r) < len(hdr): continue
    if r[hdr["Metric Name"]] != "gpu__time_duration.sum": continue
    name = r[hdr["Kernel Name"]]
    unit = r[hdr["Metric Unit"]]
    v = float(r[hdr["Metric Value"]].replace(",", ""))
    v = v / 1000.0 if unit in ("nsecond", "ns") else (v if unit in ("usecond", "us") else v * 1000.0)
    short = re.sub(r"\(.*", "", name)[:70]
    tot[short] += v; cnt[short] += 1
steps = float(sys.argv[2])
allt = sum(tot.values())
print(f"total {allt/1e3:.2f} ms over {sum(cnt.values())} kernels; per step (÷{steps:g}) {allt/steps/1e3:.2f} ms")
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{v/steps/1e3:9.3f} ms/step {cnt[k]/steps:8.1f} launches/step  {k}")
