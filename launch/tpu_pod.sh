#!/usr/bin/env bash
# Launch wings_jax training on a Cloud TPU VM slice (single host or multi-host pod slice).
#
# Every worker of the slice runs one JAX process: `python -m wings_jax.train --distributed ...`,
# which calls jax.distributed.initialize() with no arguments (the TPU runtime supplies the
# coordinator, process count and index). See launch/README.md, and `launch/tpu_pod.sh --help`.
set -euo pipefail

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG COMMAND [options] [--config.KEY=VALUE ...] [-- extra trainer args]

Drive a Cloud TPU VM slice with gcloud and run wings_jax training on every worker.

Commands:
  create   create the TPU VM slice (reuses it when 'tpu-vm describe' finds it)
  setup    copy the code (a tarball of 'git ls-files') to every worker and install it there:
           a venv, 'pip install -e <code>' and jax[tpu]
  sync     copy the code only (no pip); enough after 'setup' since the install is editable
  train    start 'python -m wings_jax.train --distributed' on all workers, in the background
           (setsid nohup), logs in ~/wings_jax_logs/train.log on each worker
  logs     stream the training log of one worker (--worker, default 0)
  status   show on every worker whether training runs, and the last log line
  stop     send SIGTERM to the trainer on all workers (it saves a checkpoint and exits);
           --force sends SIGKILL to the whole process group instead
  delete   delete the slice
  all      create, setup, train

Slice options (required by every command):
  --project P          GCP project
  --zone Z             zone, e.g. us-east5-a
  --name N             TPU VM (slice) name
Create options:
  --accelerator T      accelerator type, e.g. v4-32, v5p-32, v5litepod-16, v6e-8 (required by create/all)
  --version V          TPU runtime version; default from the generation:
                         v2/v3/v4: tpu-ubuntu2204-base   v5e (v5litepod): v2-alpha-tpuv5-lite
                         v5p: v2-alpha-tpuv5            v6e: v2-alpha-tpuv6e
  --spot               create Spot VMs (pre-emptible; resume from the last checkpoint)
  --reserved           use reserved capacity
  --create-arg ARG     extra argument for 'tpu-vm create' (repeatable), e.g. --create-arg=--network=NET
Train options:
  --config PATH        config file, relative to the repo root, e.g. configs/finetune.py (required by train/all)
  --workdir gs://...   checkpoint/log directory, must be shared by all workers (required by train/all)
  --config.KEY=VALUE   config override passed to the trainer (repeatable); so is every argument after --
  --env KEY=VALUE      environment variable exported for the trainer on every worker (repeatable)
  --allow-local-workdir  accept a workdir that is not gs:// (only sensible for a single-host slice)
Other options:
  --worker W           worker for 'logs' (default 0; 'all' streams every worker)
  --lines N            lines of history shown by 'logs' (default 100)
  --force              'stop' with SIGKILL instead of SIGTERM
  --stop-timeout S     seconds 'stop' waits for the trainer to exit (default 300)
  --python PY          python used to create the venv on the workers (default python3)
  --jax-spec SPEC      pip requirement for JAX on TPU (default 'jax[tpu]')
  --remote-dir D       code directory on the workers, relative to \$HOME (default wings_jax);
                       the venv is D_venv and the logs D_logs
  --ssh-arg ARG        extra argument for every 'tpu-vm ssh/scp' (repeatable), e.g. --ssh-arg=--tunnel-through-iap
  --dry-run            print every command ('+ ' prefix, one per line) instead of running it
  -h, --help           this text

Examples:
  $PROG all --project my-proj --zone us-east5-a --name wings-v5p --accelerator v5p-32 \\
      --config configs/finetune.py --workdir gs://my-bucket/wings/run1 --config.train.steps=2000
  $PROG logs --project my-proj --zone us-east5-a --name wings-v5p --worker 1
  $PROG stop --project my-proj --zone us-east5-a --name wings-v5p
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

info() {
  if ((DRY_RUN)); then printf '# %s\n' "$*"; else printf '%s: %s\n' "$PROG" "$*" >&2; fi
}

# Quote one word for a POSIX shell: unchanged when it only has safe characters, else '...'.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quote a command line, words separated by one space.
qcmd() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

# Print a command ('+ ' prefix) and run it, or only print it in --dry-run mode.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(qcmd "$@")"
  else
    printf '+ %s\n' "$(qcmd "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
DRY_RUN=0
PROJECT="" ZONE="" NAME="" ACCEL="" VERSION="" CONFIG="" WORKDIR=""
WORKER=0 LINES=100 FORCE=0 STOP_TIMEOUT=300 PYTHON=python3 JAX_SPEC='jax[tpu]'
REMOTE_DIR=wings_jax SPOT=0 RESERVED=0 ALLOW_LOCAL_WORKDIR=0
OVERRIDES=() ENVS=() CREATE_ARGS=() SSH_ARGS=()

for a in "$@"; do
  case $a in -h | --help) usage; exit 0 ;; --) break ;; esac
done
if (($# == 0)); then
  usage >&2
  die "missing COMMAND (one of: create setup sync train logs status stop delete all)"
fi
CMD=$1
shift
case $CMD in
  create | setup | sync | train | logs | status | stop | delete | all) ;;
  -*) die "missing COMMAND: the first argument must be one of create setup sync train logs status stop delete all (got option '$CMD')" ;;
  *) die "unknown command '$CMD' (expected one of: create setup sync train logs status stop delete all)" ;;
esac

while (($#)); do
  arg=$1
  shift
  if [[ $arg == --config.* ]]; then # config override: --config.k=v or --config.k v
    if [[ $arg == *=* ]]; then
      OVERRIDES+=("$arg")
    else
      (($#)) || die "override $arg needs a value (use $arg=VALUE)"
      OVERRIDES+=("$arg=$1")
      shift
    fi
    continue
  fi
  opt=$arg val="" has_val=0
  if [[ $arg == --*=* ]]; then opt=${arg%%=*} val=${arg#*=} has_val=1; fi
  case $opt in
    --project | --zone | --name | --accelerator | --version | --config | --workdir | --worker | \
      --lines | --stop-timeout | --python | --jax-spec | --remote-dir | --env | --create-arg | --ssh-arg)
      if ((!has_val)); then
        # A following option is not taken as the value (except for the pass-through options).
        if (($# == 0)) || [[ $1 == --* && $opt != --create-arg && $opt != --ssh-arg ]]; then
          die "option $opt needs a value"
        fi
        val=$1
        shift
      fi
      [[ -n $val ]] || die "option $opt needs a non-empty value"
      case $opt in
        --project) PROJECT=$val ;;
        --zone) ZONE=$val ;;
        --name) NAME=$val ;;
        --accelerator) ACCEL=$val ;;
        --version) VERSION=$val ;;
        --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;;
        --worker) WORKER=$val ;;
        --lines) LINES=$val ;;
        --stop-timeout) STOP_TIMEOUT=$val ;;
        --python) PYTHON=$val ;;
        --jax-spec) JAX_SPEC=$val ;;
        --remote-dir) REMOTE_DIR=$val ;;
        --env) ENVS+=("$val") ;;
        --create-arg) CREATE_ARGS+=("$val") ;;
        --ssh-arg) SSH_ARGS+=("$val") ;;
      esac
      ;;
    --dry-run | --spot | --reserved | --force | --allow-local-workdir)
      ((!has_val)) || die "option $opt takes no value"
      case $opt in
        --dry-run) DRY_RUN=1 ;;
        --spot) SPOT=1 ;;
        --reserved) RESERVED=1 ;;
        --force) FORCE=1 ;;
        --allow-local-workdir) ALLOW_LOCAL_WORKDIR=1 ;;
      esac
      ;;
    --)
      OVERRIDES+=("$@")
      break
      ;;
    *) die "unknown option '$arg'" ;;
  esac
done

# ---------------------------------------------------------------------------------------------
# Validation (all of it before any command runs, so 'all' never creates a slice it cannot use)
# ---------------------------------------------------------------------------------------------
need() { # need VALUE FLAG
  [[ -n $1 ]] || die "'$CMD' needs $2"
}
need "$PROJECT" "--project PROJECT"
need "$ZONE" "--zone ZONE"
need "$NAME" "--name NAME"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' is not a valid TPU name (lowercase letters, digits, '-'; starts with a letter)"

case $CMD in create | all) need "$ACCEL" "--accelerator TYPE (e.g. v5p-32, v4-32, v5litepod-16, v6e-8)" ;; esac
case $CMD in
  train | all)
    need "$CONFIG" "--config PATH (e.g. configs/<x>.py)"
    need "$WORKDIR" "--workdir gs://BUCKET/PATH"
    if [[ $WORKDIR != gs://* ]] && ((!ALLOW_LOCAL_WORKDIR)); then
      die "--workdir must be a gs:// path shared by all workers (got '$WORKDIR'); pass --allow-local-workdir to override"
    fi
    if [[ $CONFIG != /* && ! -e $ROOT/${CONFIG%%:*} ]]; then
      info "warning: config '${CONFIG%%:*}' not found under $ROOT (it is resolved on the workers, relative to the code dir)"
    fi
    for e in ${ENVS[@]+"${ENVS[@]}"}; do
      [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$e' is not KEY=VALUE"
    done
    ;;
esac
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index or 'all' (got '$WORKER')"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number (got '$LINES')"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "--stop-timeout must be a number of seconds (got '$STOP_TIMEOUT')"
# (setup replaces this directory: no '.', '..' or hidden components, nothing outside $HOME)
REMOTE_DIR=${REMOTE_DIR%/}
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ ]] ||
  die "--remote-dir must be a plain path relative to \$HOME, without hidden components (got '$REMOTE_DIR')"

# Runtime version and worker count from the accelerator type.
#   vN-<cores> (v2, v3, v4, v5p): the number counts TensorCores, 2 per chip, 4 chips per TPU VM,
#     so workers = cores / 8 (at least 1): v4-8 -> 1, v4-32 -> 16 chips -> 4, v5p-32 -> 4.
#   v5litepod-<chips>, v6e-<chips>: the number counts chips (1 TensorCore each); slices of up to
#     8 chips are one TPU VM; larger slices use 4-chip TPU VMs, so workers = chips / 4
#     (v5litepod-16 -> 4, v6e-256 -> 64). The physical hosts hold 8 chips each (chips / 8).
# The worker count is informational only: every command addresses the workers with --worker=all.
default_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "" ;;
  esac
}
describe_accel() {
  local t=$1 n=${1##*-} chips workers
  [[ $n =~ ^[0-9]+$ ]] || return 0
  case $t in
    v2-* | v3-* | v4-* | v5p-*)
      chips=$((n / 2))
      workers=$((n / 8))
      ;;
    v5litepod-* | v5e-* | v6e-*)
      chips=$n
      if ((n <= 8)); then workers=1; else workers=$((n / 4)); fi
      ;;
    *) return 0 ;;
  esac
  ((workers >= 1)) || workers=1
  info "accelerator $t: $chips chips, $workers TPU VM worker(s), one JAX process per worker"
}

if [[ -n $ACCEL ]]; then
  if [[ -z $VERSION ]]; then VERSION=$(default_version "$ACCEL"); fi
  if [[ -z $VERSION && ($CMD == create || $CMD == all) ]]; then
    die "no default runtime version for accelerator '$ACCEL'; pass --version"
  fi
  describe_accel "$ACCEL"
fi

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
TPU=(gcloud compute tpus tpu-vm)
LOC=("--project=$PROJECT" "--zone=$ZONE")
# Remote paths: every remote script starts with REMOTE_VARS, which sets WJ_CODE (the code),
# WJ_VENV (the venv) and WJ_LOGS (train.log, train.pid) under the worker's $HOME.
REMOTE_VARS="WJ_CODE=\"\$HOME\"/$(q "$REMOTE_DIR")
WJ_VENV=\"\$HOME\"/$(q "${REMOTE_DIR}_venv")
WJ_LOGS=\"\$HOME\"/$(q "${REMOTE_DIR}_logs")"
R_TARBALL="${REMOTE_DIR//\//_}-src.tar.gz" # in $HOME

# Join a multi-line script into one line (so that every command prints on one line): lines are
# joined with '; ', or with a space after 'then', 'do', 'else', '{', '&', '&&', '||' and '|'.
oneline() {
  local out="" line
  while IFS= read -r line; do
    line=${line#"${line%%[![:space:]]*}"}
    [[ -n $line ]] || continue
    if [[ -z $out ]]; then
      out=$line
    elif [[ $out =~ (^|[[:space:]])(then|do|else|\{)$ || $out =~ [\&\|]$ ]]; then
      out+=" $line"
    else
      out+="; $line"
    fi
  done <<<"$1"
  printf '%s' "$out"
}

# remote WORKER SCRIPT: run a bash script (with set -euo pipefail and REMOTE_VARS) on one worker,
# or on all of them with WORKER=all.
remote() {
  run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" "--worker=$1" ${SSH_ARGS[@]+"${SSH_ARGS[@]}"} "--command=$(oneline "set -euo pipefail
$REMOTE_VARS
$2")"
}

cmd_create() {
  local args=("${TPU[@]}" create "$NAME" "${LOC[@]}" "--accelerator-type=$ACCEL" "--version=$VERSION")
  if ((SPOT)); then args+=(--spot); fi
  if ((RESERVED)); then args+=(--reserved); fi
  args+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  local describe=("${TPU[@]}" describe "$NAME" "${LOC[@]}" '--format=value(state)')
  if ((DRY_RUN)); then
    run "${describe[@]}"
    info "create runs only when describe finds no slice named $NAME"
    run "${args[@]}"
    return
  fi
  local state
  printf '+ %s\n' "$(qcmd "${describe[@]}")" >&2
  if state=$("${describe[@]}" 2>/dev/null); then
    case $state in
      PREEMPTED | TERMINATED | STOPPED | STOPPING)
        die "TPU VM $NAME exists in state $state; run '$PROG delete' (or start it) first" ;;
    esac
    info "reusing existing TPU VM $NAME (state ${state:-unknown})"
  else
    run "${args[@]}"
  fi
}

# The tarball holds the files 'git ls-files' reports (tracked, plus untracked files that are not
# ignored), minus tracked files deleted from the work tree.
make_tarball() { # make_tarball OUT
  local out=$1 list line f
  line="$(qcmd git -C "$ROOT" ls-files -z --cached --others --exclude-standard) | $(qcmd tar -czf "$out" -C "$ROOT" --null -T -)"
  if ((DRY_RUN)); then
    printf '+ %s\n' "$line"
    return
  fi
  printf '+ %s\n' "$line" >&2
  git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$ROOT is not a git checkout (the code tarball is made from 'git ls-files')"
  list=$(dirname "$out")/files
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      [[ -e $ROOT/$f || -L $ROOT/$f ]] && printf '%s\0' "$f"
    done >"$list"
  COPYFILE_DISABLE=1 tar -czf "$out" -C "$ROOT" --null -T "$list"
}

copy_code() {
  local tmp tarball
  if ((DRY_RUN)); then
    tmp="${TMPDIR:-/tmp}/wings_jax-src.XXXXXX"
  else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/wings_jax-src.XXXXXX")
    # shellcheck disable=SC2064 # expand now: tmp is local
    trap "rm -rf $(q "$tmp")" EXIT
  fi
  tarball=$tmp/src.tar.gz
  make_tarball "$tarball"
  run "${TPU[@]}" scp "$tarball" "$NAME:$R_TARBALL" "${LOC[@]}" --worker=all ${SSH_ARGS[@]+"${SSH_ARGS[@]}"}
  local script
  script="rm -rf \"\$WJ_CODE\"
mkdir -p \"\$WJ_CODE\"
tar -xzf $(q "$R_TARBALL") -C \"\$WJ_CODE\"
rm -f $(q "$R_TARBALL")
echo \"\$(hostname): code in \$WJ_CODE\""
  remote all "$script"
}

cmd_setup() {
  copy_code
  local py venv_pkg
  py=$(q "$PYTHON")
  venv_pkg=$(q "${PYTHON##*/}-venv")
  local script
  script="if [ ! -x \"\$WJ_VENV\"/bin/python ]; then
  $py -m venv \"\$WJ_VENV\" || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $venv_pkg && rm -rf \"\$WJ_VENV\" && $py -m venv \"\$WJ_VENV\"; }
fi
\"\$WJ_VENV\"/bin/python -m pip install -q --upgrade pip
\"\$WJ_VENV\"/bin/python -m pip install -q -e \"\$WJ_CODE\" $(q "$JAX_SPEC")
\"\$WJ_VENV\"/bin/python -c 'import jax, wings_jax; print(\"jax\", jax.__version__)'
echo \"\$(hostname): installed wings_jax in \$WJ_VENV\""
  remote all "$script"
}

cmd_train() {
  local train=(-m wings_jax.train --distributed --config "$CONFIG" --workdir "$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  local exports="" e
  for e in ${ENVS[@]+"${ENVS[@]}"}; do exports+="export ${e%%=*}=$(q "${e#*=}")"$'\n'; done
  local script
  script="mkdir -p \"\$WJ_LOGS\"
if [ -f \"\$WJ_LOGS\"/train.pid ] && kill -0 \"\$(cat \"\$WJ_LOGS\"/train.pid)\" 2>/dev/null; then
  echo \"\$(hostname): training already runs (pid \$(cat \"\$WJ_LOGS\"/train.pid)); use '$PROG stop' first\" >&2
  exit 1
fi
if [ -f \"\$WJ_LOGS\"/train.log ]; then mv -f \"\$WJ_LOGS\"/train.log \"\$WJ_LOGS\"/train.log.prev; fi
cd \"\$WJ_CODE\"
${exports}setsid nohup \"\$WJ_VENV\"/bin/python $(qcmd "${train[@]}") >\"\$WJ_LOGS\"/train.log 2>&1 </dev/null &
echo \$! >\"\$WJ_LOGS\"/train.pid
echo \"\$(hostname): started pid \$!, log \$WJ_LOGS/train.log\""
  remote all "$script"
  info "training started on all workers of $NAME; follow it with: $PROG logs --project $(q "$PROJECT") --zone $(q "$ZONE") --name $NAME"
}

cmd_logs() {
  remote "$WORKER" "tail -n $LINES -F \"\$WJ_LOGS\"/train.log"
}

cmd_status() {
  local script="if [ -f \"\$WJ_LOGS\"/train.pid ] && kill -0 \"\$(cat \"\$WJ_LOGS\"/train.pid)\" 2>/dev/null; then
  s=\"running (pid \$(cat \"\$WJ_LOGS\"/train.pid))\"
else
  s='not running'
fi
echo \"\$(hostname): \$s | \$(tail -n 1 \"\$WJ_LOGS\"/train.log 2>/dev/null || true)\""
  remote all "$script"
}

cmd_stop() {
  # SIGTERM goes to the trainer only (it checkpoints, then exits); SIGKILL to its process group.
  local sig=TERM kill_cmd="kill -TERM \"\$p\" 2>/dev/null || true"
  if ((FORCE)); then
    sig=KILL
    kill_cmd="kill -KILL -- -\"\$p\" 2>/dev/null || kill -KILL \"\$p\" 2>/dev/null || true"
  fi
  # The pid file names the trainer (started with setsid, so it leads its own process group).
  # Without one, look for the trainer by its command line ('[w]' keeps this shell from matching).
  local script="pids=''
if [ -f \"\$WJ_LOGS\"/train.pid ] && kill -0 \"\$(cat \"\$WJ_LOGS\"/train.pid)\" 2>/dev/null; then pids=\$(cat \"\$WJ_LOGS\"/train.pid); fi
if [ -z \"\$pids\" ]; then pids=\$(pgrep -f -- '-m [w]ings_jax[.]train' || true); fi
if [ -z \"\$pids\" ]; then echo \"\$(hostname): no trainer running\"; rm -f \"\$WJ_LOGS\"/train.pid; exit 0; fi
for p in \$pids; do
  $kill_cmd
done
echo \"\$(hostname): sent SIG$sig to \$pids, waiting up to ${STOP_TIMEOUT}s\"
i=0
while [ \$i -lt $STOP_TIMEOUT ]; do
  alive=''
  for p in \$pids; do if kill -0 \"\$p\" 2>/dev/null; then alive=\"\$alive \$p\"; fi; done
  if [ -z \"\$alive\" ]; then echo \"\$(hostname): stopped\"; rm -f \"\$WJ_LOGS\"/train.pid; exit 0; fi
  sleep 1
  i=\$((i + 1))
done
echo \"\$(hostname): still running:\$alive (try --force)\" >&2
exit 1"
  remote all "$script"
}

cmd_delete() {
  run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet
}

if ((DRY_RUN)); then info "dry run: $PROG $CMD (commands are printed, not run)"; fi
case $CMD in
  create) cmd_create ;;
  setup) cmd_setup ;;
  sync) copy_code ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  all)
    cmd_create
    cmd_setup
    cmd_train
    ;;
esac
