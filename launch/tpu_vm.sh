#!/usr/bin/env bash
# Cloud TPU VM lifecycle for softalign: create -> install -> run -> logs -> stop -> delete.
#
#   launch/tpu_vm.sh create  NAME --zone=ZONE --accelerator-type=v4-32 --version=tpu-ubuntu2204-base [--spot]
#   launch/tpu_vm.sh install NAME --zone=ZONE [--repo=URL [--ref=REF]]
#   launch/tpu_vm.sh run     NAME --zone=ZONE --config=configs/vitb16.py --workdir=gs://BUCKET/run [--config.k=v ...]
#   launch/tpu_vm.sh logs    NAME --zone=ZONE [--worker=N|all] [--follow]
#   launch/tpu_vm.sh stop    NAME --zone=ZONE
#   launch/tpu_vm.sh delete  NAME --zone=ZONE
#
# Every subcommand takes --dry-run: it prints the exact commands, shell-quoted, one per line, and runs nothing.
# `launch/tpu_vm.sh --help` describes every option. Avoids bash 4 features so that macOS's bash 3.2 can run it.
set -euo pipefail

readonly PROG="launch/tpu_vm.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly REMOTE_DIR="softalign"               # on every worker, relative to the home directory
readonly REMOTE_LOG="logs/softalign.log"      # relative to REMOTE_DIR; every worker writes its own
readonly VENV_PYTHON=".venv/bin/python"       # relative to REMOTE_DIR; made by `install`
readonly VENV_PYTHON_VERSION="3.12"           # softalign needs Python >= 3.11 (jax 0.10); uv fetches it
COPIED=(softalign configs requirements.txt)   # what `install` copies from this checkout
# The training process: argv[0] is some python, then `-m softalign.main`. Anchored at the start of the command
# line so that it never matches the remote shell that runs pgrep/pkill (whose own command line contains it).
readonly PROC_PATTERN='^[^ ]*python[0-9.]* -m softalign[.]main( |$)'

usage() {
    cat <<EOF
usage: $PROG COMMAND NAME --zone=ZONE [options] [--dry-run]

Manages a Cloud TPU VM (a single host or a multi-host slice) for softalign with gcloud. Commands that act on the
workers run on all of them at once (--worker=all), because every host of a slice runs the same program.

commands:
  create   create the TPU VM
             --accelerator-type=TYPE   e.g. v4-8, v4-32, v5litepod-16 (required)
             --version=RUNTIME         TPU software version, e.g. tpu-ubuntu2204-base (v4),
                                       v2-alpha-tpuv5-lite (v5e) (required)
             --spot | --preemptible    cheaper capacity that can be preempted
             -- ARGS...                more flags for 'gcloud compute tpus tpu-vm create'
  install  put softalign on every worker in ~/$REMOTE_DIR and install its dependencies with jax[tpu]
             (default) copy this checkout's ${COPIED[*]} with 'gcloud ... scp --recurse'
             --repo=URL [--ref=REF]    instead: git fetch REF (branch, tag or commit; default: the remote's
                                       HEAD) of URL on every worker
             --python=PY               use this interpreter (Python >= 3.11) and its pip; default: a uv
                                       virtualenv ~/$REMOTE_DIR/.venv with Python $VENV_PYTHON_VERSION
  run      start 'python -m softalign.main --multihost=on' on every worker, in the background with nohup,
           output appended to ~/$REMOTE_DIR/$REMOTE_LOG on each worker
             --config=FILE             config file, relative to ~/$REMOTE_DIR (required)
             --workdir=gs://...        shared run directory (required; must be shared storage on a slice)
             --config.KEY=VALUE ...    config overrides, passed through
             -- ARGS...                more softalign flags, passed through
             --follow                  run in the foreground instead, streaming every worker's output
             --python=PY               the interpreter 'install --python' used
  logs     show the end of the log
             --worker=N|all            which worker (default 0, the one that reports progress)
             --lines=N                 how many lines (default 100)
             --follow                  keep following (Ctrl-C stops watching, not training)
  stop     send SIGTERM to softalign on every worker (it saves a checkpoint and exits), then wait for it
             --timeout=SECONDS         how long to wait for the exit (default 600; 0: do not wait)
  delete   delete the TPU VM (gcloud asks for confirmation)
             --yes                     do not ask

options for every command:
  NAME | --name=NAME      the TPU VM's name (default: \$TPU_NAME)
  --zone=ZONE             its zone (required; default: \$TPU_ZONE)
  --project=PROJECT       its project (default: \$TPU_PROJECT, else gcloud's configured project)
  --dry-run               print the commands (shell-quoted, one per line) instead of running them
  -h, --help              this help

Workers are reached with 'gcloud compute tpus tpu-vm ssh/scp --worker=all': run 'ssh-add' with your
google_compute_engine key first, so gcloud does not ask for the passphrase once per worker.
EOF
}

die_usage() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    printf 'usage: %s COMMAND NAME --zone=ZONE [options] [--dry-run]   (%s --help for details)\n' \
        "$PROG" "$PROG" >&2
    exit 2
}

warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# Runs a command, or with --dry-run prints it shell-quoted on one line.
run_cmd() {
    if [[ $DRY_RUN == 1 ]]; then
        local line
        line="$(printf '%q ' "$@")"
        printf '%s\n' "${line% }"
    else
        "$@"
    fi
}

# Shell-quotes its arguments into one string for a remote shell.
quote_args() {
    local line
    line="$(printf '%q ' "$@")"
    printf '%s' "${line% }"
}

gcloud_tpu() {
    local verb="$1"
    shift
    run_cmd gcloud compute tpus tpu-vm "$verb" "$NAME" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"} "$@"
}

# on_workers WORKER REMOTE_COMMAND: one ssh per worker, run concurrently by gcloud.
on_workers() {
    gcloud_tpu ssh --worker="$1" --command="$2"
}

# Which options each command takes (beyond the common ones).
options_of() {
    case "$1" in
        create) echo "accelerator-type version spot preemptible" ;;
        install) echo "repo ref python" ;;
        run) echo "config workdir follow python" ;;
        logs) echo "worker lines follow" ;;
        stop) echo "timeout" ;;
        delete) echo "yes" ;;
    esac
}

is_flag() {  # options that take no value
    case "$1" in
        dry-run | spot | preemptible | follow | yes) return 0 ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------------------------------------------------------
# Argument parsing

if [[ $# -eq 0 ]]; then
    die_usage "no command given (create, install, run, logs, stop, delete)"
fi
case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    create | install | run | logs | stop | delete) CMD="$1" ;;
    -*) die_usage "no command given: the command comes first (create, install, run, logs, stop, delete)" ;;
    *) die_usage "unknown command '$1' (expected create, install, run, logs, stop or delete)" ;;
esac
shift

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
ACCELERATOR_TYPE=""
VERSION=""
SPOT=0
PREEMPTIBLE=0
REPO=""
REF=""
PYTHON=""
CONFIG=""
WORKDIR=""
FOLLOW=0
WORKER="0"
LINES="100"
TIMEOUT="600"
YES=0
OVERRIDES=()     # --config.KEY=VALUE for run
EXTRA=()         # after --
name_given=0

while [[ $# -gt 0 ]]; do
    arg="$1"
    shift
    case "$arg" in
        --)
            EXTRA=("$@")
            break
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --config.*)
            [[ $CMD == run ]] || die_usage "$arg: config overrides are for 'run'"
            [[ $arg == *=* ]] || die_usage "$arg: write config overrides as --config.KEY=VALUE"
            OVERRIDES+=("$arg")
            continue
            ;;
        --*=*)
            opt="${arg%%=*}"
            opt="${opt#--}"
            value="${arg#*=}"
            is_flag "$opt" && die_usage "--$opt takes no value"
            ;;
        --*)
            opt="${arg#--}"
            if is_flag "$opt"; then
                value=""
            elif [[ $# -gt 0 && $1 != -* ]]; then
                value="$1"
                shift
            else
                die_usage "--$opt needs a value"
            fi
            ;;
        -*) die_usage "unknown option $arg" ;;
        *)
            [[ $name_given == 0 ]] || die_usage "unexpected argument '$arg' (the TPU name is already '$NAME')"
            NAME="$arg"
            name_given=1
            continue
            ;;
    esac
    case " name zone project dry-run $(options_of "$CMD") " in
        *" $opt "*) ;;
        *) die_usage "unknown option --$opt for '$CMD'" ;;
    esac
    case "$opt" in
        name) NAME="$value" ;;
        zone) ZONE="$value" ;;
        project) PROJECT="$value" ;;
        dry-run) DRY_RUN=1 ;;
        accelerator-type) ACCELERATOR_TYPE="$value" ;;
        version) VERSION="$value" ;;
        spot) SPOT=1 ;;
        preemptible) PREEMPTIBLE=1 ;;
        repo) REPO="$value" ;;
        ref) REF="$value" ;;
        python) PYTHON="$value" ;;
        config) CONFIG="$value" ;;
        workdir) WORKDIR="$value" ;;
        follow) FOLLOW=1 ;;
        worker) WORKER="$value" ;;
        lines) LINES="$value" ;;
        timeout) TIMEOUT="$value" ;;
        yes) YES=1 ;;
    esac
done

[[ -n $NAME ]] || die_usage "$CMD: the TPU name is required (NAME, --name or \$TPU_NAME)"
[[ $NAME != -* ]] || die_usage "$CMD: bad TPU name '$NAME'"
[[ -n $ZONE ]] || die_usage "$CMD: --zone is required (or set \$TPU_ZONE)"
if [[ ${#EXTRA[@]} -gt 0 && $CMD != create && $CMD != run ]]; then
    die_usage "$CMD takes no arguments after --"
fi

# ---------------------------------------------------------------------------------------------------------------
# Commands

cmd_create() {
    [[ -n $ACCELERATOR_TYPE ]] || die_usage "create: --accelerator-type is required (e.g. v4-32, v5litepod-16)"
    [[ -n $VERSION ]] || die_usage "create: --version is required (e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite)"
    [[ $SPOT == 0 || $PREEMPTIBLE == 0 ]] || die_usage "create: --spot and --preemptible exclude each other"
    local args=(--accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
    [[ $SPOT == 0 ]] || args+=(--spot)
    [[ $PREEMPTIBLE == 0 ]] || args+=(--preemptible)
    gcloud_tpu create "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
}

cmd_install() {
    [[ -z $REF || -n $REPO ]] || die_usage "install: --ref needs --repo"
    if [[ -n $REPO ]]; then
        local q_repo q_ref
        q_repo="$(quote_args "$REPO")"
        q_ref="$(quote_args "${REF:-HEAD}")"
        on_workers all "mkdir -p $REMOTE_DIR && cd $REMOTE_DIR && { test -d .git || git init --quiet; } \
&& { git remote set-url origin $q_repo 2>/dev/null || git remote add origin $q_repo; } \
&& git fetch --quiet origin $q_ref && git checkout --quiet --force --detach FETCH_HEAD \
&& echo \"\$(hostname): \$(git log -1 --format='%h %s')\""
    else
        local sources=() item
        for item in "${COPIED[@]}"; do
            [[ -e $ROOT/$item ]] || { echo "$PROG: $ROOT/$item is missing" >&2; exit 1; }
            sources+=("$ROOT/$item")
        done
        on_workers all "mkdir -p $REMOTE_DIR"
        run_cmd gcloud compute tpus tpu-vm scp --recurse "${sources[@]}" "$NAME:$REMOTE_DIR/" \
            --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"} --worker=all
    fi
    if [[ -n $PYTHON ]]; then
        on_workers all "cd $REMOTE_DIR && $(quote_args "$PYTHON") -m pip install 'jax[tpu]' -r requirements.txt"
    else
        # The TPU images ship Python 3.10; uv (from PyPI) provides a newer one in a virtualenv.
        on_workers all "cd $REMOTE_DIR && python3 -m pip install --user --quiet --upgrade uv \
&& { test -x $VENV_PYTHON || python3 -m uv venv --python $VENV_PYTHON_VERSION .venv; } \
&& python3 -m uv pip install --python $VENV_PYTHON 'jax[tpu]' -r requirements.txt"
    fi
}

cmd_run() {
    [[ -n $CONFIG ]] || die_usage "run: --config is required (e.g. --config=configs/vitb16.py)"
    [[ -n $WORKDIR ]] || die_usage "run: --workdir is required (e.g. --workdir=gs://BUCKET/runs/vitb16)"
    if [[ $WORKDIR != gs://* ]]; then
        warn "--workdir=$WORKDIR is not a gs:// path: on a multi-host slice every worker must see the same" \
            "workdir (checkpoints), so use a GCS bucket or a shared mount at the same path on every worker"
    fi
    local train
    train="$(quote_args "${PYTHON:-$VENV_PYTHON}" -m softalign.main --multihost=on --config="$CONFIG" \
        --workdir="$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})"
    local prologue
    prologue="cd $REMOTE_DIR || exit 1; mkdir -p logs; \
if pgrep -f '$PROC_PATTERN' >/dev/null; then \
echo \"\$(hostname): softalign is already running; stop it first\" >&2; exit 1; fi; \
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) start on \$(hostname)\" >> $REMOTE_LOG;"
    if [[ $FOLLOW == 1 ]]; then
        on_workers all "set -o pipefail; $prologue $train 2>&1 | tee -a $REMOTE_LOG"
    else
        on_workers all "$prologue nohup $train >> $REMOTE_LOG 2>&1 < /dev/null & \
echo \"\$(hostname): started softalign (pid \$!), log ~/$REMOTE_DIR/$REMOTE_LOG\""
    fi
}

cmd_logs() {
    [[ $LINES =~ ^[0-9]+$ ]] || die_usage "logs: --lines must be a number, got '$LINES'"
    local tail_cmd="tail -n $LINES"
    [[ $FOLLOW == 0 ]] || tail_cmd="$tail_cmd -F"
    if [[ $WORKER =~ ^[0-9]+$ ]]; then
        on_workers "$WORKER" "$tail_cmd $REMOTE_DIR/$REMOTE_LOG"
    else  # several workers print at once: prefix each line with the worker's host name
        on_workers "$WORKER" "$tail_cmd $REMOTE_DIR/$REMOTE_LOG | sed -u \"s/^/\$(hostname): /\""
    fi
}

cmd_stop() {
    [[ $TIMEOUT =~ ^[0-9]+$ ]] || die_usage "stop: --timeout must be a number of seconds, got '$TIMEOUT'"
    local wait_exit="echo \"\$h: not waiting for the exit\""
    if [[ $TIMEOUT -gt 0 ]]; then
        wait_exit="t=0; while pgrep -f '$PROC_PATTERN' >/dev/null; do \
if [ \$t -ge $TIMEOUT ]; then echo \"\$h: still running after $TIMEOUT s\" >&2; exit 1; fi; \
sleep 5; t=\$((t + 5)); done; echo \"\$h: stopped\""
    fi
    on_workers all "h=\$(hostname); if pkill -TERM -f '$PROC_PATTERN'; then \
echo \"\$h: SIGTERM sent; softalign saves a checkpoint and exits\"; $wait_exit; \
else echo \"\$h: softalign is not running\"; fi"
}

cmd_delete() {
    if [[ $YES == 1 ]]; then
        gcloud_tpu delete --quiet
    else
        gcloud_tpu delete
    fi
}

"cmd_$CMD"
