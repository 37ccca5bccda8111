# Sourced by eval/gpu_suite.sh and eval/gpu_inference.sh: the output folder, the environment and
# step LIMIT CMD..., which runs one command under its own time limit (so one slow step cannot take
# the others down) and keeps the last $TAIL lines of its console. LIMIT_SCALE (default 1)
# multiplies every limit (a CPU smoke run of a section needs far longer).
set -u
OUT=${2:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9}
TAIL=${TAIL:-40}
step() { local limit=$(( $1 * ${LIMIT_SCALE:-1} )); shift; echo "=== $* (limit ${limit}s)"; local t0=$(date +%s)
         timeout "$limit" "$@" 2>&1 | tail -n "$TAIL"; echo "=== done in $(( $(date +%s) - t0 ))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
