#!/bin/bash
# Train the two experts as two parallel jobs, then phase 3 once both have finished. Run from the
# repository root with a dataset name (configs/<dataset>_phase*.yaml) or a config prefix:
#   scripts/slurm/experts_in_parallel.sh places_lt
#   scripts/slurm/experts_in_parallel.sh configs/cpu/fmnist_lt     # the CPU demo configs
# Each expert job runs phase 1 then phase 2 (afterok dependency); phase 3 waits for both and reads
# the two phase-2 checkpoints (runs/<dataset>/phase2_{visual,vl}/checkpoints/last.ckpt).
# Options for every job (e.g. --partition, --account, or for the CPU configs
# --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=2) go in SBATCH_ARGS.
set -euo pipefail
WHAT=${1:?usage: scripts/slurm/experts_in_parallel.sh DATASET|CONFIG_PREFIX (places_lt, imagenet_lt, inat18, cifar100_lt, configs/cpu/fmnist_lt)}
case "$WHAT" in */*) PREFIX=$WHAT ;; *) PREFIX=configs/$WHAT ;; esac
HERE=$(dirname "$0")

# Every config must exist before anything is submitted: a missing phase-3 config would otherwise
# surface hours later, after both experts have trained.
missing=0
for suffix in phase1 phase1_vl phase2 phase2_vl phase3; do
  [ -f "${PREFIX}_${suffix}.yaml" ] || { echo "experts_in_parallel.sh: ${PREFIX}_${suffix}.yaml not found" >&2; missing=1; }
done
[ "$missing" = 0 ] || { echo "experts_in_parallel.sh: nothing submitted" >&2; exit 1; }

read -r -a EXTRA <<< "${SBATCH_ARGS:-}"
submit() { sbatch --parsable "${EXTRA[@]}" "$@"; }
p1v=$(submit "$HERE/phase.sbatch" "${PREFIX}_phase1.yaml")
p1l=$(submit "$HERE/phase.sbatch" "${PREFIX}_phase1_vl.yaml")
p2v=$(submit --dependency="afterok:$p1v" "$HERE/phase.sbatch" "${PREFIX}_phase2.yaml")
p2l=$(submit --dependency="afterok:$p1l" "$HERE/phase.sbatch" "${PREFIX}_phase2_vl.yaml")
p3=$(submit --dependency="afterok:$p2v:$p2l" "$HERE/phase.sbatch" "${PREFIX}_phase3.yaml")
echo "submitted: phase1 $p1v $p1l, phase2 $p2v $p2l, phase3 $p3 (after both)"
