#!/usr/bin/env bash
# A TPU pod slice over gcloud, from nothing to a running job and back: create a queued resource, set up
# every worker (uv, Python 3.11, this project with the tpu extra), run the same command on all workers
# (detached, one log per worker, copied to the bucket), read logs, stop (SIGTERM first: the trainer
# saves a checkpoint), delete. Needs only bash and gcloud here. Every gcloud command is printed
# (`+ gcloud ...`) before it runs; --dry_run prints them and runs nothing. README: "Run on a TPU pod".
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/pod.sh VERB --name=NAME --zone=ZONE [--project=PROJECT] [--dry_run] [flags] [-- COMMAND]

verbs:
  create  --accelerator_type=TYPE [--runtime_version=V] [--spot | --reserved] [--service_account=EMAIL]
          [--wait_s=1800] [--poll_s=30]
          a queued resource NAME (TPU VM NAME), then wait until it is ACTIVE (at most --wait_s;
          0: do not wait). The runtime version defaults to the one for the TPU generation
          (v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base).
  setup   [--repo=URL [--ref=REF]] [--extras=tpu] [--worker=all]
          on every worker: uv, a Python 3.11 venv (uv downloads it: the images ship 3.10), the project
          in ~/gemma2_jax with pip extras --extras. Without --repo this checkout is copied (git's
          tracked and untracked, not ignored, files); with --repo it is cloned (or fetched) at --ref.
  exec    [--worker=0] -- COMMAND
          COMMAND in the foreground in ~/gemma2_jax with the venv on PATH (smoke tests, one-offs).
  run     [--worker=all] [--log_dir=gs://...] [--log_every_s=60] -- COMMAND
          COMMAND on the workers, detached (setsid nohup), stdout+stderr of worker I appended to
          ~/gemma2_jax_run/worker-I.log and copied every --log_every_s and at exit to
          LOG_DIR/worker-I.log (default LOG_DIR: the command's --workdir=gs://.../logs). A gemma2_jax
          command on all workers needs --distributed. Re-running the same command resumes the job
          from its last checkpoint. Refused on a worker whose previous job still runs.
  logs    [--worker=0] [--lines=100] [--follow]     the tail of a worker's log, over ssh
  logs    --from=gs://.../logs [--dest=pod_logs]     every worker's log, from the bucket
  status  [--worker=all]                            the queued resource's state and each worker's job
  stop    [--worker=all] [--grace_s=600]
          SIGTERM to each worker's job (the trainer saves a checkpoint and exits), then SIGKILL what
          still runs after --grace_s seconds.
  delete  [--yes]     the queued resource and its TPU VM (--yes: no confirmation prompt)
  help    this text

--worker: all, an index or a comma-separated list. --remote_dir=gemma2_jax: the project's directory
under $HOME on the workers (the job's logs and pid go to ~/<remote_dir>_run).
COMMAND: several words are passed as they are (quoted for the remote shell); one word is a shell
command line (e.g. 'cd x && python -m ...'). Flags take --flag=value or --flag value.
Bad input: one `error: ...` line, exit 2. A failed gcloud command: its exit code.
EOF
}

die() { echo "error: $* (see scripts/pod.sh --help)" >&2; exit 2; }
fail() { echo "error: $*" >&2; exit 1; }

# Quote one word for a POSIX shell (readable: safe words stay bare, others get single quotes).
SAFE_RE='^[-A-Za-z0-9_@%+=:,./]+$'
shq() {
  if [[ -n $1 && $1 =~ $SAFE_RE ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# Print a command as `+ cmd` (like set -x): to stderr, so that stdout is the command's own output; with
# --dry_run to stdout, as the output.
show() {
  local line="+" a
  for a in "$@"; do line+=" $(shq "$a")"; done
  if [[ -n $DRY ]]; then printf '%s\n' "$line"; else printf '%s\n' "$line" >&2; fi
}
# Print a command, then run it unless --dry_run.
run_cmd() {
  show "$@"
  if [[ -z $DRY ]]; then "$@"; fi
}

# --- arguments ---------------------------------------------------------------------------------
VERB=${1:-}
case $VERB in
  ""|help|-h|--help) usage; exit 0 ;;
  create|setup|exec|run|logs|status|stop|delete) shift ;;
  *) die "unknown verb '$VERB'; one of: create setup exec run logs status stop delete" ;;
esac

NAME="" ZONE="" PROJECT="" DRY="" ACCEL="" RUNTIME="" SPOT="" RESERVED="" SA="" WAIT_S=1800 POLL_S=30
REPO="" REF="" EXTRAS=tpu WORKER="" LOG_DIR="" LOG_EVERY_S=60 LINES=100 FOLLOW="" FROM="" DEST=pod_logs
GRACE_S=600 YES="" REMOTE_DIR=gemma2_jax
# The flags of each verb (besides --name --zone --project --dry_run --remote_dir).
case $VERB in
  create) ALLOWED="--accelerator_type --runtime_version --spot --reserved --service_account --wait_s --poll_s" ;;
  setup) ALLOWED="--repo --ref --extras --worker" ;;
  exec|status) ALLOWED="--worker" ;;
  run) ALLOWED="--worker --log_dir --log_every_s" ;;
  logs) ALLOWED="--worker --lines --follow --from --dest" ;;
  stop) ALLOWED="--worker --grace_s" ;;
  delete) ALLOWED="--yes" ;;
esac
ALLOWED=" --name --zone --project --dry_run --remote_dir $ALLOWED "
SWITCHES=" --dry_run --spot --reserved --follow --yes "
CMD_ARGS=()
HAVE_CMD=""
while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    HAVE_CMD=1
    CMD_ARGS=("$@")
    break
  fi
  case $arg in
    -h|--help) usage; exit 0 ;;
    --*=*) key=${arg%%=*} val=${arg#*=} ;;
    --*) key=$arg val="" ;;
    *) die "unexpected argument '$arg' (a command goes after --)" ;;
  esac
  [[ $ALLOWED == *" $key "* ]] || die "unknown flag $key for $VERB"
  if [[ $SWITCHES == *" $key "* ]]; then
    [[ $arg == "$key" ]] || die "$key takes no value"
    val=1
  elif [[ $arg == "$key" ]]; then
    [[ $# -gt 0 ]] || die "$key needs a value"
    val=$1
    shift
  fi
  case $key in
    --name) NAME=$val ;;
    --zone) ZONE=$val ;;
    --project) PROJECT=$val ;;
    --dry_run) DRY=1 ;;
    --remote_dir) REMOTE_DIR=$val ;;
    --accelerator_type) ACCEL=$val ;;
    --runtime_version) RUNTIME=$val ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --service_account) SA=$val ;;
    --wait_s) WAIT_S=$val ;;
    --poll_s) POLL_S=$val ;;
    --repo) REPO=$val ;;
    --ref) REF=$val ;;
    --extras) EXTRAS=$val ;;
    --worker) WORKER=$val ;;
    --log_dir) LOG_DIR=$val ;;
    --log_every_s) LOG_EVERY_S=$val ;;
    --lines) LINES=$val ;;
    --follow) FOLLOW=1 ;;
    --from) FROM=$val ;;
    --dest) DEST=$val ;;
    --grace_s) GRACE_S=$val ;;
    --yes) YES=1 ;;
  esac
done

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for pair in "wait_s:$WAIT_S" "poll_s:$POLL_S" "log_every_s:$LOG_EVERY_S" "lines:$LINES" "grace_s:$GRACE_S"; do
  is_uint "${pair#*:}" || die "--${pair%%:*} must be a whole number of ${pair%%:*}, not '${pair#*:}'"
done
[[ $LOG_EVERY_S -gt 0 ]] || die "--log_every_s must be at least 1"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die "--remote_dir is a directory name under \$HOME, not '$REMOTE_DIR'"
[[ $EXTRAS =~ ^[A-Za-z0-9_,-]*$ ]] || die "--extras is a comma-separated list of extras, not '$EXTRAS'"
if [[ -n $SPOT && -n $RESERVED ]]; then die "--spot and --reserved exclude each other"; fi

# The joined command line: one word is a shell command line already; several are quoted one by one.
CMD=""
if [[ ${#CMD_ARGS[@]} -eq 1 ]]; then
  CMD=${CMD_ARGS[0]}
elif [[ ${#CMD_ARGS[@]} -gt 1 ]]; then
  for a in "${CMD_ARGS[@]}"; do CMD+="${CMD:+ }$(shq "$a")"; done
fi
case $VERB in
  exec|run) [[ -n ${CMD//[[:space:]]/} ]] || die "$VERB needs a command after --, e.g. scripts/pod.sh $VERB --name=N --zone=Z -- python -m gemma2_jax.train ..." ;;
  *) [[ -z $HAVE_CMD ]] || die "$VERB takes no command" ;;
esac

if [[ $VERB == logs && -n $FROM ]]; then
  [[ $FROM == gs://* ]] || die "--from is the bucket folder of the logs (gs://.../logs), not '$FROM'"
else
  [[ -n $NAME ]] || die "$VERB needs --name=NAME (the queued resource and TPU VM)"
  [[ -n $ZONE ]] || die "$VERB needs --zone=ZONE"
fi
[[ $VERB != create || -n $ACCEL ]] || die "create needs --accelerator_type, e.g. v5p-256 or v6e-64"

case $VERB in
  exec|logs) WORKER=${WORKER:-0} ;;
  *) WORKER=${WORKER:-all} ;;
esac
[[ $WORKER =~ ^(all|[0-9]+(,[0-9]+)*)$ ]] || die "--worker is all, a worker index or a comma-separated list, not '$WORKER'"

if [[ $VERB == run ]]; then
  if [[ $WORKER == all && $CMD == *gemma2_jax.* && $CMD != *--distributed* && $CMD != *--coordinator_address* ]]; then
    die "a gemma2_jax command on all workers needs --distributed (every worker joins one job)"
  fi
  if [[ -z $LOG_DIR ]]; then  # the command's --workdir=gs://..., + /logs
    workdir_re="--workdir[= ]+'?(gs://[^ ']+)"
    if [[ $CMD =~ $workdir_re ]]; then LOG_DIR="${BASH_REMATCH[1]%/}/logs"; fi
  fi
  [[ -z $LOG_DIR || $LOG_DIR == gs://* ]] || die "--log_dir is a bucket folder (gs://...), not '$LOG_DIR'"
  LOG_DIR=${LOG_DIR%/}
fi

PROJ=()
if [[ -n $PROJECT ]]; then PROJ=(--project="$PROJECT"); fi
LOC=(--zone="$ZONE" ${PROJ[@]+"${PROJ[@]}"})

# --- remote scripts (bash on each worker; W = its index) -----------------------------------------
prelude() {
  cat <<EOF
set -e
D=\$HOME/$REMOTE_DIR R=\$HOME/${REMOTE_DIR}_run
W=\${POD_WORKER_ID:-\$(curl -fs -m 10 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || true)}
W=\${W:-0}
running() { [ -f "\$R/job.pid" ] && kill -0 -- "-\$(cat "\$R/job.pid")" 2>/dev/null; }
EOF
}

# The detached job of `run`: $1 command, $2 log, $3 bucket copy of the log ('' = none), $4 run dir,
# $5 copy interval. The command gets its own session (process group = its pid, in job.pid), so `stop`
# signals all of it and nothing else; this wrapper then copies the log and records the exit code. A
# failed copy leaves its error in log_copy.err (the job goes on).
read -r -d '' JOB_SCRIPT <<'EOF' || true
cmd=$1 log=$2 uri=$3 run=$4 every=$5
. .venv/bin/activate
copy() { if [ -n "$uri" ]; then gcloud storage cp --quiet "$log" "$uri" >/dev/null 2>"$run/log_copy.err" || true; fi; }
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): $cmd" >>"$log"
setsid bash -c "$cmd" >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$run/job.pid"
(while sleep "$every"; do copy; done) &
copier=$!
rc=0
wait "$pid" || rc=$?
kill "$copier" 2>/dev/null || true
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) exit code $rc" >>"$log"
copy
echo "$rc" >"$run/exit_code"
EOF

remote_setup() {
  prelude
  cat <<EOF
REPO=$(shq "$REPO") REF=$(shq "$REF") EXTRAS=$(shq "$EXTRAS") SRC=\$HOME/${REMOTE_DIR}_src.tgz
EOF
  cat <<'EOF'
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh >/dev/null; fi
if [ -n "$REPO" ]; then
  if [ -d "$D/.git" ]; then git -C "$D" fetch --quiet --tags origin; else git clone --quiet "$REPO" "$D"; fi
  if [ -z "$REF" ]; then c=origin/HEAD
  elif git -C "$D" rev-parse -q --verify "origin/$REF^{commit}" >/dev/null; then c=origin/$REF
  else c=$REF; fi
  git -C "$D" checkout --quiet --detach "$c"
else
  mkdir -p "$D"
  tar -xzf "$SRC" -C "$D"
  rm -f "$SRC"
fi
cd "$D"
[ -x .venv/bin/python ] || uv venv --quiet --seed --python 3.11 .venv
uv pip install --quiet --python .venv/bin/python -e ".${EXTRAS:+[$EXTRAS]}"
echo "worker $W: $D ready: $(.venv/bin/python -c 'import sys, importlib.metadata as m
def v(p):
  try: return m.version(p)
  except m.PackageNotFoundError: return "-"
print("Python %d.%d.%d" % sys.version_info[:3], "jax", v("jax"), "jaxlib", v("jaxlib"), "libtpu", v("libtpu"))')"
EOF
}

remote_exec() {
  prelude
  printf 'CMD=%s\n' "$(shq "$CMD")"
  cat <<'EOF'
cd "$D"
. .venv/bin/activate
eval "$CMD"
EOF
}

remote_run() {
  prelude
  printf 'CMD=%s URI=%s EVERY=%s\nJOB=%s\n' "$(shq "$CMD")" "$(shq "$LOG_DIR")" "$LOG_EVERY_S" \
    "$(shq "$JOB_SCRIPT")"
  cat <<EOF
if [ ! -x "\$D/.venv/bin/python" ]; then echo "error: worker \$W: no \$D/.venv: run scripts/pod.sh setup first" >&2; exit 1; fi
mkdir -p "\$R"
if running; then
  echo "error: worker \$W: a job is still running (process group \$(cat "\$R/job.pid")): scripts/pod.sh stop first" >&2
  exit 1
fi
EOF
  cat <<'EOF'
rm -f "$R/job.pid" "$R/exit_code"
L=$R/worker-$W.log
U=${URI:+$URI/worker-$W.log}
cd "$D"
setsid nohup bash -c "$JOB" job "$CMD" "$L" "$U" "$R" "$EVERY" >/dev/null 2>&1 </dev/null &
i=0
while [ ! -s "$R/job.pid" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -s "$R/job.pid" ] || { echo "error: worker $W: the job did not start (see $L)" >&2; exit 1; }
echo "worker $W: started (process group $(cat "$R/job.pid")); log $L${U:+, copied to $U}"
EOF
}

remote_logs() {
  prelude
  printf 'LINES=%s FOLLOW=%s\n' "$LINES" "$(shq "$FOLLOW")"
  cat <<'EOF'
L=$R/worker-$W.log
[ -f "$L" ] || { echo "error: worker $W: no log $L (no job was run here)" >&2; exit 1; }
if [ -n "$FOLLOW" ]; then exec tail -n "$LINES" -F "$L"; else tail -n "$LINES" "$L"; fi
EOF
}

remote_status() {
  prelude
  cat <<EOF
if running; then s="running (process group \$(cat "\$R/job.pid"))"
EOF
  cat <<'EOF'
elif [ -f "$R/exit_code" ]; then s="finished, exit code $(cat "$R/exit_code")"
elif [ -f "$R/job.pid" ]; then s="not running, no exit code (the worker restarted or the job was killed)"
else s="no job"; fi
last=$(tail -c 4096 "$R/worker-$W.log" 2>/dev/null | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1 || true)
echo "worker $W: $s${last:+; log: $last}"
EOF
}

remote_stop() {
  prelude
  printf 'GRACE=%s\n' "$GRACE_S"
  cat <<EOF
if ! running; then echo "worker \$W: no job running"; exit 0; fi
EOF
  cat <<'EOF'
P=$(cat "$R/job.pid")
kill -TERM -- "-$P"
echo "worker $W: SIGTERM to the job (process group $P); waiting up to ${GRACE}s for its checkpoint"
t=0
while kill -0 -- "-$P" 2>/dev/null && [ $t -lt $((GRACE * 5)) ]; do sleep 0.2; t=$((t + 1)); done
if kill -0 -- "-$P" 2>/dev/null; then
  kill -KILL -- "-$P" 2>/dev/null || true
  echo "worker $W: still running after ${GRACE}s: SIGKILL"
fi
t=0
while [ ! -f "$R/exit_code" ] && [ $t -lt 300 ]; do sleep 0.2; t=$((t + 1)); done
echo "worker $W: stopped, exit code $(cat "$R/exit_code" 2>/dev/null || echo unknown)"
EOF
}

ssh_cmd() {  # $1 workers, $2 remote script
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# --- verbs ---------------------------------------------------------------------------------------
ROOT=$(cd "$(dirname "$0")/.." && pwd)
P_FLAGS="--name=$(shq "$NAME") --zone=$(shq "$ZONE")${PROJECT:+ --project=$(shq "$PROJECT")}"

case $VERB in
create)
  args=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}"
        --accelerator-type="$ACCEL" --runtime-version="${RUNTIME:-$(default_runtime "$ACCEL")}"
        --scopes=https://www.googleapis.com/auth/cloud-platform)
  if [[ -n $SPOT ]]; then args+=(--spot); fi
  if [[ -n $RESERVED ]]; then args+=(--reserved); fi
  if [[ -n $SA ]]; then args+=(--service-account="$SA"); fi
  run_cmd "${args[@]}"
  [[ $WAIT_S -gt 0 ]] || exit 0
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format="value(state.state)")
  show "${describe[@]}"
  [[ -z $DRY ]] || exit 0
  waited=0
  while :; do
    state=$("${describe[@]}")
    echo "queued resource $NAME: $state (${waited}s)"
    case $state in
      ACTIVE) echo "next: scripts/pod.sh setup $P_FLAGS"; exit 0 ;;
      FAILED|SUSPENDING|SUSPENDED)
        fail "queued resource $NAME is $state; see gcloud compute tpus queued-resources describe $NAME --zone=$ZONE, then scripts/pod.sh delete $P_FLAGS" ;;
    esac
    if [[ $waited -ge $WAIT_S ]]; then
      fail "queued resource $NAME is still $state after ${WAIT_S}s; it stays queued: scripts/pod.sh status $P_FLAGS to check, scripts/pod.sh delete $P_FLAGS to give up"
    fi
    sleep "$POLL_S"
    waited=$((waited + POLL_S))
  done
  ;;
setup)
  if [[ -z $REPO ]]; then
    [[ -z $REF ]] || die "--ref needs --repo (without --repo this checkout is copied as it is)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tgz=$tmp/${REMOTE_DIR}_src.tgz
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      line="+ (cd $(shq "$ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(shq "$tgz"))"
      if [[ -n $DRY ]]; then echo "$line"; else echo "$line" >&2; fi
      if [[ -z $DRY ]]; then
        (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
          | while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done \
          | tar --null -T - -czf "$tgz")
      fi
    else
      run_cmd tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs -czf "$tgz" .
    fi
    run_cmd gcloud compute tpus tpu-vm scp "$tgz" "$NAME:${REMOTE_DIR}_src.tgz" "${LOC[@]}" --worker="$WORKER"
  fi
  ssh_cmd "$WORKER" "$(remote_setup)"
  ;;
exec) ssh_cmd "$WORKER" "$(remote_exec)" ;;
run) ssh_cmd "$WORKER" "$(remote_run)" ;;
logs)
  if [[ -n $FROM ]]; then
    run_cmd mkdir -p "$DEST"
    run_cmd gcloud storage cp "${FROM%/}/worker-*.log" "$DEST/"
  else
    ssh_cmd "$WORKER" "$(remote_logs)"
  fi
  ;;
status)
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format="value(state.state)")
  show "${describe[@]}"
  state=ACTIVE
  if [[ -z $DRY ]]; then
    state=$("${describe[@]}")
    echo "queued resource $NAME: $state"
  fi
  if [[ $state == ACTIVE ]]; then ssh_cmd "$WORKER" "$(remote_status)"; fi
  ;;
stop) ssh_cmd "$WORKER" "$(remote_stop)" ;;
delete)
  args=(gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force)
  if [[ -n $YES ]]; then args+=(--quiet); fi
  run_cmd "${args[@]}"
  ;;
esac
