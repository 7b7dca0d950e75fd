#!/bin/bash
# Train the two experts as two parallel jobs, then phase 3 once both have finished:
#   scripts/slurm/experts_in_parallel.sh places_lt
# Each expert job runs phase 1 then phase 2 (afterok dependency); phase 3 waits for both.
# Uses the per-phase configs (configs/<dataset>_phase{1,2,3}[_vl].yaml); phase 3 reads the two
# phase-2 checkpoints they leave in runs/<dataset>/phase2_{visual,vl}/checkpoints/last.ckpt.
set -euo pipefail
DATASET=${1:?usage: scripts/slurm/experts_in_parallel.sh DATASET (places_lt, imagenet_lt, inat18, cifar100_lt)}
HERE=$(dirname "$0")

submit() { sbatch --parsable "$@"; }
p1v=$(submit "$HERE/phase.sbatch" "configs/${DATASET}_phase1.yaml")
p1l=$(submit "$HERE/phase.sbatch" "configs/${DATASET}_phase1_vl.yaml")
p2v=$(submit --dependency="afterok:$p1v" "$HERE/phase.sbatch" "configs/${DATASET}_phase2.yaml")
p2l=$(submit --dependency="afterok:$p1l" "$HERE/phase.sbatch" "configs/${DATASET}_phase2_vl.yaml")
submit --dependency="afterok:$p2v:$p2l" "$HERE/phase.sbatch" "configs/${DATASET}_phase3.yaml"
echo "submitted: phase1 $p1v $p1l, phase2 $p2v $p2l, phase3 after both"
