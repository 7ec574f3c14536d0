#!/bin/bash
# Pydra in a PBS/Torque batch job: no launcher, mpirun reads $PBS_NODEFILE.
#
#   qsub examples/batch/pbs.sh
#
#PBS -N pydra-pi
#PBS -l select=4:ncpus=16:mpiprocs=16
#PBS -l walltime=00:30:00
#PBS -j oe

set -euo pipefail
cd "$PBS_O_WORKDIR"
source "${PYDRA_VENV:-$HOME/pydra-venv}/bin/activate"

ranks=$(wc -l < "$PBS_NODEFILE")
mpirun -n "$ranks" -machinefile "$PBS_NODEFILE" python -m pydra run examples/pi.py:estimate_pi 1000 \
    --output "pi-$PBS_JOBID.json"
