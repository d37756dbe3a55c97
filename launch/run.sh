#!/usr/bin/env bash
# Launch mmer_dist training with one of the launcher configs in this folder, by name.
#   launch/run.sh cpu_2proc --config debug --shards shards/out/synth --out runs/debug
#   launch/run.sh gpu_multi --config meld_base --out runs/meld
#   launch/run.sh ds_zero2  --config debug --out runs/ds2
# Everything after the name goes to `python -m mmer_dist.train`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
name="${1:?usage: launch/run.sh NAME [train args...]; NAME is one of: $(cd "$here" && ls *.yaml | sed 's/.yaml//' | tr '\n' ' ')}"
shift
config="$here/$name.yaml"
[ -f "$config" ] || { echo "launch/run.sh: no launcher config $config" >&2; exit 2; }
# No GPU: mmer_dist builds its Accelerator for the CPU with a gloo group by itself (see cpu_2proc.yaml for
# why not --cpu). ACCELERATE_USE_CPU is deliberately not exported: it would silently turn DeepSpeed off.
# One BLAS thread per process unless the caller says otherwise.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
extra=()
case "$name" in
  ds_zero*) extra=(--deepspeed_config_file "$here/${name}.json") ;;   # absolute, whatever the cwd
esac
exec accelerate launch --config_file "$config" "${extra[@]}" -m mmer_dist.train "$@"
