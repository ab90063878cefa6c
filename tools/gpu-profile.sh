#!/usr/bin/env bash
# Where a GPU command spends its time, per kernel: runs it under Nsight Compute (ncu) with one
# metric (each kernel's duration, GPU clocks left free), then prints the kernels grouped by name,
# largest total first, with their share of all kernel time. On the GPU machine:
#
#   tools/gpu-profile.sh OUT.csv -- FLEXRUN bench train --config C --steps 1 --warmup 0 --device cuda
#
# Profile few steps: ncu serialises and replays every launch, so wall time grows by ~10-50 ms per
# kernel; durations themselves are the kernels' own. TOP (default 25) rows are printed.
set -euo pipefail
CSV="$1"
shift
[[ "${1:-}" == "--" ]] && shift
NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1 || true)"
[[ -n "$NCU" ]] || { echo "gpu-profile: ncu not found" >&2; exit 1; }
"$NCU" --csv --metrics gpu__time_duration.sum --clock-control none --log-file "$CSV" "$@" >/dev/null
python3 - "$CSV" "${TOP:-25}" <<'EOF'
import csv, sys
from collections import defaultdict
path, top = sys.argv[1], int(sys.argv[2])
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
lines = [l for l in open(path) if l.startswith('"')]
total, count = defaultdict(float), defaultdict(int)
for row in csv.DictReader(lines):
    if row.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = row["Kernel Name"].split("(")[0]
    total[name] += float(row["Metric Value"].replace(",", "")) * scale[row["Metric Unit"]]
    count[name] += 1
all_us = sum(total.values())
print(f"{sum(count.values())} kernel launches, {all_us / 1e3:.2f} ms of kernel time")
print(f"{'kernel':<44} {'launches':>8} {'ms':>9} {'share':>6}")
for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{name[:44]:<44} {count[name]:>8} {us / 1e3:>9.3f} {100 * us / all_us:>5.1f}%")
EOF
