#!/bin/bash
# Pydra in a Slurm batch job: no launcher, Slurm starts the ranks.
#
#   sbatch examples/batch/slurm.sh
#
# Rank 0 schedules, the other 63 ranks work. The environment must have Pydra
# installed with an MPI that Slurm's mpirun (or srun --mpi=pmix) can start.
#SBATCH --job-name=pydra-wordcount
#SBATCH --ntasks=64
#SBATCH --time=00:30:00
#SBATCH --output=pydra-%j.log

set -euo pipefail
source "${PYDRA_VENV:-$HOME/pydra-venv}/bin/activate"

mpirun -n "$SLURM_NTASKS" python -m pydra run examples/wordcount.py:WordCount examples/data/*.txt \
    --output "wordcount-$SLURM_JOB_ID.json"
