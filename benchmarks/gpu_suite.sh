#!/usr/bin/env bash
# The GPU suite: on a machine with an NVIDIA GPU, the `gpu` tests and the throughput benchmark
# (Restormer and DeRestormer at 1920×1080 against the papers' own protocol), results in one JSON.
#
#   bash benchmarks/gpu_wheels.sh                  # here, once: wheels the GPU machine lacks → .whl/
#   bash benchmarks/gpu_suite.sh [OUT_DIR]         # there (device tool: carry=[".whl"], OUT_DIR=$OUT)
#
# Budget: about 8 minutes on an H100/H200. Writes OUT_DIR/gpu_suite.json, gpu-tests.log,
# throughput-<model>.json and nvidia-smi.txt; exits non-zero when a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DERESTORE_HOME="${DERESTORE_HOME:-/tmp/derestore-cache}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "cannot install .whl/"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, derestore; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())" \
    | tee "$out/env.txt"

started=$(date +%s)
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -s -rs tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
tests_s=$(( $(date +%s) - started ))

for model in restormer derestormer; do
    timeout 150 python3 benchmarks/throughput.py --model "$model" --size 1920x1080 --count 12 --device cuda \
        --tile 0 > "$out/throughput-$model.json" 2> "$out/throughput-$model.err" \
        || echo "{\"model\": \"$model\", \"error\": \"exit $? (see throughput-$model.err)\"}" > "$out/throughput-$model.json"
done

python3 - "$out" "$tests_rc" "$tests_s" <<'PY'
import json, re, sys
from pathlib import Path
out, rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log = (out / "gpu-tests.log").read_text(errors="replace")
summary = re.findall(r"(\d+) (passed|failed|skipped|error)", log.splitlines()[-1] if log else "")
result = {
    "env": (out / "env.txt").read_text().strip() if (out / "env.txt").exists() else None,
    "tests": {"exit_code": rc, "seconds": seconds, **{kind: int(n) for n, kind in summary}},
    "probe": [json.loads(line) for line in log.splitlines() if line.startswith('{"probe"')],
    "throughput": {},
}
for path in sorted(out.glob("throughput-*.json")):
    try:
        result["throughput"][path.stem.removeprefix("throughput-")] = json.loads(path.read_text())
    except ValueError:
        result["throughput"][path.stem.removeprefix("throughput-")] = {"error": path.read_text()[-500:]}
(out / "gpu_suite.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
PY
exit "$tests_rc"
