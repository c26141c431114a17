# shellcheck shell=bash
# shellcheck disable=SC2034,SC2016  # CAP_SRUN/TRAIN_ARGV are for the sourcing scripts; $vars in srun's bash -c are meant literally
# Shared by the batch scripts in slurm/ (sourced; not a job script). They run from the repository root
# (`sbatch --chdir=/path/to/repo ...` or submit from there) because sbatch copies only the script itself.
#
# Job parameters come from the environment (sbatch exports the submitting shell's environment by default), so
# the same script serves every run:
#   CAP_ARGS      trainer flags, word-split (no spaces inside a value); arguments after the script name on the
#                 sbatch command line are appended verbatim
#   OUTPUT_DIR    run directory (default outputs/<job name>): checkpoints/, metrics.json, final/, train_state.json
#   DS_CONFIG     DeepSpeed config (default ds_configs/zero2.json)
#   PYTHON        interpreter with cap_ds installed (default: python)
#   SAVE_STEPS    periodic checkpoint interval in optimizer steps (default 500; 0: only on the signal)
#   MASTER_ADDR   rendezvous host (default: the NodeAddr of the allocation's first node)
#   MASTER_PORT   rendezvous port (default 20000 + job id % 10000: unique per job, stable across requeues)
#   MAX_REQUEUES  give up requeueing after this many restarts (default 20)
#   CAP_DRY_RUN   1: log each launch command instead of running it (checks a script's composition)
#
# Pre-timeout handling: the scripts ask for `--signal=B:USR1@120` (USR1 to this batch shell 120 s before the
# time limit). The trap forwards it to the training ranks (cap_ds.train checkpoints within --check_steps optimizer steps,
# writes train_state.json {"status": "preempted"} and exits 0); once every rank has exited the script runs
# `scontrol requeue $SLURM_JOB_ID`, and the restarted job (same id, same log, SLURM_RESTART_COUNT+1) resumes with
# `--resume auto` from <OUTPUT_DIR>/checkpoints/latest.

cap_log() { echo "[cap-slurm $(date +%H:%M:%S)] $*"; }

_cap_quote() {  # a command line as a shell would need it, quoting only words that need it
    local a out=""
    for a in "$@"; do
        if [[ $a =~ ^[][A-Za-z0-9_./:=,+@%^-]+$ ]]; then out+=" $a"; else out+=" $(printf '%q' "$a")"; fi
    done
    echo "$out"
}

cap_setup() {
    PYTHON=${PYTHON:-python}
    DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
    OUTPUT_DIR=${OUTPUT_DIR:-outputs/${SLURM_JOB_NAME:-cap}}
    SAVE_STEPS=${SAVE_STEPS:-500}
    MAX_REQUEUES=${MAX_REQUEUES:-20}
    RESTARTS=${SLURM_RESTART_COUNT:-0}
    [[ -f cap_ds/train.py ]] || { cap_log "run from the repository root (sbatch --chdir=REPO): no cap_ds/train.py in $PWD"; exit 2; }
    mkdir -p "$OUTPUT_DIR"
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    if [[ -z ${MASTER_ADDR:-} ]]; then
        # NodeAddr is how Slurm itself reaches the node (often equal to its name); fall back to the name.
        MASTER_ADDR=$(scontrol show node -o "$first" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
        MASTER_ADDR=${MASTER_ADDR:-$first}
    fi
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    export PYTHON DS_CONFIG OUTPUT_DIR MASTER_ADDR MASTER_PORT
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export TOKENIZERS_PARALLELISM=false
    # shellcheck disable=SC2206
    CAP_ARGV=(${CAP_ARGS:-} "$@")
    cap_train_args "$OUTPUT_DIR"
    # The pre-timeout signal may come at any time from here on: never let it kill this shell.
    CAP_SIGNALED="" CAP_PID=""
    trap '_cap_on_signal USR1' USR1
    trap '_cap_on_signal TERM' TERM
    cap_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart $RESTARTS on $SLURM_JOB_NODELIST" \
            "(${SLURM_NNODES:-1} nodes), master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"
}

# One rank per Slurm task: srun starts them all; each takes RANK / LOCAL_RANK / WORLD_SIZE from its task ids.
# With --gpus-per-node (not --gpus-per-task) every task sees the node's GPUs and DeepSpeed picks LOCAL_RANK's.
CAP_SRUN=(srun --kill-on-bad-exit=1 bash -c
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}; exec "$@"'
    rank-env)

cap_completed() {  # OUTPUT_DIR: true if that run already finished
    [[ -f $1/train_state.json ]] && [[ $("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' \
        "$1/train_state.json" 2>/dev/null) == completed ]]
}

# cap_train_args OUTPUT_DIR [FLAGS...]: set TRAIN_ARGV to the flags a launch passes to cap_ds/train.py: the
# given flags (default: CAP_ARGS + the script's arguments), then config, output dir, checkpointing, resume.
cap_train_args() {
    local out=$1
    shift
    (($#)) || set -- "${CAP_ARGV[@]}"
    TRAIN_ARGV=("$@" --deepspeed "$DS_CONFIG" --output_dir "$out" --save_steps "$SAVE_STEPS" --resume auto)
}

_cap_status() {  # OUTPUT_DIR STAMP: the train_state.json status written after STAMP, else nothing
    local f=$1/train_state.json
    [[ -f $f && $f -nt $2 ]] || return 0
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' "$f" 2>/dev/null || true
}

_cap_on_signal() {
    CAP_SIGNALED=$1
    if [[ $1 == TERM ]]; then  # scancel or the time limit: Slurm signals every step itself; never requeue
        cap_log "got SIGTERM: the job is ending (the ranks checkpoint if they reach a step in time)"
        return
    fi
    if [[ -n $CAP_PID ]] && kill -0 "$CAP_PID" 2>/dev/null; then
        cap_log "got SIG$1: asking the ranks to checkpoint and stop"
        cap_forward_signal "$1" || cap_log "forwarding SIG$1 failed"
    else
        cap_log "got SIG$1 between launches: requeueing before the next one"
    fi
}

# Default forwarding: to the launch command (srun passes USR1 on to every task of its step).
# Scripts whose ranks are not under a foreground srun redefine this after sourcing.
cap_forward_signal() { kill -s "$1" "$CAP_PID" 2>/dev/null; }

_cap_requeue() {  # OUTPUT_DIR: put the job back in the queue; the next run resumes from the latest checkpoint
    if ((RESTARTS >= MAX_REQUEUES)); then
        cap_log "not requeueing: already restarted $RESTARTS times (MAX_REQUEUES=$MAX_REQUEUES)"
        exit 75
    fi
    cap_log "requeueing job $SLURM_JOB_ID; it resumes from $(cat "$1/checkpoints/latest" 2>/dev/null || echo 'the start')"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0  # slurmctld ends this run of the job now; the next one starts from the checkpoint
    fi
    cap_log "scontrol requeue failed (submitted with --no-requeue?): resubmit to resume from the checkpoint"
    exit 75
}

# cap_run OUTPUT_DIR CMD...: run one resumable training launch in the background, forward the pre-timeout
# signal, and when it ends: return 0 if the run completed; requeue the job (and exit) if it stopped on the
# signal; else exit with its status.
cap_run() {
    local out=$1 stamp rc status
    shift
    mkdir -p "$out"
    [[ $CAP_SIGNALED == USR1 ]] && _cap_requeue "$out"
    cap_log "launch:$(_cap_quote "$@")"
    [[ ${CAP_DRY_RUN:-0} == 1 ]] && return 0
    stamp=$(mktemp "${TMPDIR:-/tmp}/cap-launch.XXXXXX")
    "$@" &
    CAP_PID=$!
    while :; do
        wait "$CAP_PID" && rc=0 || rc=$?
        # wait returns >128 when a trapped signal interrupts it; keep waiting while the launch runs.
        ((rc > 128)) && kill -0 "$CAP_PID" 2>/dev/null && continue
        break
    done
    CAP_PID=""
    status=$(_cap_status "$out" "$stamp")
    rm -f "$stamp"
    cap_log "launch exited with $rc, train_state: ${status:-none}, signal: ${CAP_SIGNALED:-none}"
    if [[ $status == completed && $rc == 0 ]]; then
        return 0
    fi
    if [[ $CAP_SIGNALED == USR1 || ($status == preempted && $CAP_SIGNALED != TERM) ]]; then
        _cap_requeue "$out"
    fi
    cap_log "training failed (exit $rc)"
    exit $((rc == 0 ? 1 : rc))
}
