#!/usr/bin/env bash
# A Cloud TPU pod from nothing to a running llama2_jax job and back, through gcloud.
# docs/multihost.md walks through it; `launch/tpu_pod.sh --help` lists every option.
#
#   launch/tpu_pod.sh create my-pod us-east5-a --accelerator-type=v5p-128
#   launch/tpu_pod.sh setup  my-pod us-east5-a
#   launch/tpu_pod.sh run    my-pod us-east5-a -- python -m llama2_jax train \
#       --config=configs/pretrain.py:7b --workdir=gs://BUCKET/runs/7b --config.data.dataset=mycorpus
#   launch/tpu_pod.sh logs   my-pod us-east5-a
#   launch/tpu_pod.sh stop   my-pod us-east5-a
#   launch/tpu_pod.sh delete my-pod us-east5-a
#
# Everything it creates carries the label created_by=llama2_jax, and it changes or deletes only
# TPUs that carry it. On the workers it writes only under --remote-dir. --dry-run prints the gcloud
# commands it would run, one per line, and runs none of them.
set -euo pipefail

readonly LABEL_KEY=created_by
readonly LABEL_VALUE=llama2_jax
# What `setup` leaves in --remote-dir: the commit it holds. Its presence is also what lets a later
# setup replace the directory's contents, so a directory this script did not make is never touched.
readonly MARKER=.llama2_jax_checkout
readonly LOG=logs/run.log
readonly PID_FILE=logs/run.pid
# Defined first on the workers, in every command sent there (single quotes: they expand there).
# fail: one line naming the worker, the problem and the fix. running: whether any process of
# process group $1 is alive; zombies do not count, because where nothing reaps orphans (a container
# without an init) a command that exited lingers as one.
# shellcheck disable=SC2016
readonly WORKER_FUNCTIONS=(
  'fail() { echo "$(hostname): $*" >&2; exit 1; }'
  'running() { ps -e -o pgid=,stat= | awk -v group="$1" '"'"'$1 == group && $2 !~ /^Z/ { found = 1 } END { exit !found }'"'"'; }'
)

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh [--dry-run] [OPTIONS] SUBCOMMAND TPU_NAME ZONE [-- COMMAND...]

subcommands:
  create   create the pod: one slice (tpu-vm create), or --slices=N slices as one queued resource
  setup    on every worker: this checkout's files (or --repo-url at --commit) in --remote-dir,
           a virtualenv with requirements.txt, jax[tpu] and gcsfs
  run      start COMMAND on every worker in the background, from --remote-dir in its virtualenv;
           its output goes to REMOTE_DIR/logs/run.log on each worker
  logs     the last --lines lines of every worker's log, each line prefixed by the worker's name
  stop     SIGTERM the command on every worker (a training run checkpoints and exits), and
           SIGKILL whatever is left after --wait seconds
  delete   delete the pod (queued resource and all its slices when --slices > 1)

options (a flag, or the environment variable named after it):
  --project=ID             TPU_POD_PROJECT           default: gcloud's configured project
  --accelerator-type=TYPE  TPU_POD_ACCELERATOR_TYPE  default: v5p-8 (each slice's type)
  --runtime-version=V      TPU_POD_RUNTIME_VERSION   TPU VM image; default by generation:
                           v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e,
                           v4 tpu-ubuntu2204-base
  --slices=N               TPU_POD_SLICES            default 1; give every subcommand the same N.
                           `run` adds --config.mesh.dcn_data=N (data parallel across slices) to a
                           command that takes --config, unless it sets a --config.mesh.dcn_* itself
  --spot | --reserved      TPU_POD_CAPACITY=spot|reserved   default: on demand
  --repo-url=URL           TPU_POD_REPO_URL          setup clones URL instead of copying this checkout
  --commit=SHA             TPU_POD_COMMIT            with --repo-url; default: this checkout's HEAD
  --allow-dirty            setup from a checkout with uncommitted changes (copied as they are)
  --remote-dir=DIR         TPU_POD_REMOTE_DIR        default: llama2_jax (relative to the home dir)
  --python=PYTHON          TPU_POD_PYTHON            default: python3 (3.10 or newer)
  --jax-version=V          TPU_POD_JAX_VERSION       default: the jax== pin of requirements.txt
  --lines=N                logs: lines per worker, default 100
  --follow                 logs: keep following the logs (Ctrl-C to stop)
  --wait=SECONDS           stop: how long to wait for the checkpoint before SIGKILL, default 600
  --dry-run                print the gcloud commands instead of running them
  -h, --help               this text

exit status: 0 done, 2 usage error, 1 anything else (gcloud's message, then one line naming the fix).
EOF
}

usage_error() {
  echo "error: $1; see launch/tpu_pod.sh --help" >&2
  exit 2
}

die() {
  echo "error: $*" >&2
  exit 1
}

# A word as the shell reads it: bare when it is safe, else single-quoted. Used for every command
# line this script prints or sends to the workers, so what is printed is exactly what runs.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Joins shell commands into the one line `gcloud ... ssh --command` takes.
join_commands() {
  local out="" part
  for part in "$@"; do
    if [ -z "$out" ]; then out=$part
    elif [[ $out == *"&" ]]; then out+=" $part"  # `cmd &; next` is a syntax error
    else out+="; $part"; fi
  done
  printf '%s' "$out"
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# ---------------------------------------------------------------------------------------------
# Options: environment first, flags override.
project=${TPU_POD_PROJECT:-}
accelerator_type=${TPU_POD_ACCELERATOR_TYPE:-v5p-8}
runtime_version=${TPU_POD_RUNTIME_VERSION:-}
slices=${TPU_POD_SLICES:-1}
capacity=${TPU_POD_CAPACITY:-}
repo_url=${TPU_POD_REPO_URL:-}
commit=${TPU_POD_COMMIT:-}
remote_dir=${TPU_POD_REMOTE_DIR:-llama2_jax}
python=${TPU_POD_PYTHON:-python3}
jax_version=${TPU_POD_JAX_VERSION:-}
lines=100
wait_seconds=600
follow=0
allow_dirty=0
dry_run=0
positional=()
command=()

set_option() {
  case $1 in
    --project) project=$2 ;;
    --accelerator-type) accelerator_type=$2 ;;
    --runtime-version) runtime_version=$2 ;;
    --slices) slices=$2 ;;
    --repo-url) repo_url=$2 ;;
    --commit) commit=$2 ;;
    --remote-dir) remote_dir=$2 ;;
    --python) python=$2 ;;
    --jax-version) jax_version=$2 ;;
    --lines) lines=$2 ;;
    --wait) wait_seconds=$2 ;;
    *) usage_error "unknown option $1" ;;
  esac
}

while (($#)); do
  case $1 in
    --) shift; command=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --allow-dirty) allow_dirty=1 ;;
    --follow) follow=1 ;;
    --spot) capacity=spot ;;
    --reserved) capacity=reserved ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --project | --accelerator-type | --runtime-version | --slices | --repo-url | --commit | \
      --remote-dir | --python | --jax-version | --lines | --wait)
      (($# >= 2)) || usage_error "$1 needs a value"
      set_option "$1" "$2"
      shift ;;
    -*) usage_error "unknown option $1" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

((${#positional[@]} == 3)) || usage_error "expected SUBCOMMAND TPU_NAME ZONE, got ${#positional[@]} arguments"
subcommand=${positional[0]}
name=${positional[1]}
zone=${positional[2]}
case $subcommand in
  create | setup | run | logs | stop | delete) ;;
  *) usage_error "unknown subcommand $subcommand (create, setup, run, logs, stop, delete)" ;;
esac
if [ "$subcommand" = run ]; then
  ((${#command[@]})) || usage_error "run needs the command after --, e.g. -- python -m llama2_jax train ..."
elif ((${#command[@]})); then
  usage_error "only run takes a command after --"
fi
[[ $name =~ ^[a-z]([-a-z0-9]{0,45}[a-z0-9])?$ ]] ||
  usage_error "TPU_NAME $name is not a TPU name (lowercase letters, digits and hyphens, starting with a letter)"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || usage_error "ZONE $zone is not a zone, e.g. us-east5-a"
[[ $slices =~ ^[1-9][0-9]*$ ]] || usage_error "--slices=$slices is not a positive integer"
[[ $lines =~ ^[1-9][0-9]*$ ]] || usage_error "--lines=$lines is not a positive integer"
[[ $wait_seconds =~ ^[0-9]+$ ]] || usage_error "--wait=$wait_seconds is not a number of seconds"
[[ $accelerator_type =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  usage_error "--accelerator-type=$accelerator_type is not a TPU type, e.g. v5p-128"
case $capacity in
  "" | spot | reserved) ;;
  *) usage_error "TPU_POD_CAPACITY=$capacity; use spot, reserved or leave it empty for on demand" ;;
esac
# The directory is cleared on every setup: refuse anything that could name home itself or above it.
[[ $remote_dir =~ ^/?[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ && $remote_dir != *..* ]] ||
  usage_error "--remote-dir=$remote_dir must name a directory below home (e.g. llama2_jax) or an absolute path"
if [ -z "$runtime_version" ]; then
  case $accelerator_type in
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v5litepod-*) runtime_version=v2-alpha-tpuv5-lite ;;
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
    v4-*) runtime_version=tpu-ubuntu2204-base ;;
    *) usage_error "no default runtime version for $accelerator_type; pass --runtime-version" ;;
  esac
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------------------------------------
# gcloud, and the workers through it.

gcloud_do() {
  local args=("$@")
  [ -z "$project" ] || args+=("--project=$project")
  if ((dry_run)); then
    quote_all gcloud "${args[@]}"
    echo
    return 0
  fi
  gcloud "${args[@]}" || die "gcloud ${*:1:4} failed (its message is above); fix that and rerun"
}

# Runs commands, joined into one bash command line, on every worker of every slice.
on_workers() {
  local line
  line=$(join_commands "${WORKER_FUNCTIONS[@]}" "$@")
  if ((slices > 1)); then
    gcloud_do compute tpus queued-resources ssh "$name" --zone="$zone" --node=all --worker=all --command="$line"
  else
    gcloud_do compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$line"
  fi
}

copy_to_workers() {
  if ((slices > 1)); then
    gcloud_do compute tpus queued-resources scp "$1" "$name:$2" --zone="$zone" --node=all --worker=all
  else
    gcloud_do compute tpus tpu-vm scp "$1" "$name:$2" --zone="$zone" --worker=all
  fi
}

# Worker-side: fail if a command that `run` started from DIR (a shell expression) still runs.
refuse_if_running() {
  local pid_file="$1/$PID_FILE"
  printf '%s' "if [ -f \"$pid_file\" ] && running \"\$(cat \"$pid_file\")\"; then fail \"a command is still running (process group \$(cat \"$pid_file\")); stop it first\"; fi"
}

# Refuses to go on unless the TPU carries this script's label. With --dry-run the check is printed
# like every other command, and assumed to pass.
require_owned() {
  local describe kind
  if ((slices > 1)); then
    kind="queued resource"
    describe=(compute tpus queued-resources describe "$name" --zone="$zone"
      "--format=value(tpu.nodeSpec[0].node.labels.$LABEL_KEY)")
  else
    kind=TPU
    describe=(compute tpus tpu-vm describe "$name" --zone="$zone" "--format=value(labels.$LABEL_KEY)")
  fi
  if ((dry_run)); then
    gcloud_do "${describe[@]}"
    return 0
  fi
  local args=("${describe[@]}") owner
  [ -z "$project" ] || args+=("--project=$project")
  owner=$(gcloud "${args[@]}") ||
    die "cannot describe $kind $name in $zone; check the name and zone" \
      "(a pod of several slices needs the --slices it was created with)"
  [ "$owner" = "$LABEL_VALUE" ] ||
    die "$kind $name has no label $LABEL_KEY=$LABEL_VALUE, so launch/tpu_pod.sh did not create it" \
      "and leaves it alone; manage it with gcloud directly"
}

# ---------------------------------------------------------------------------------------------
# Subcommands.

create() {
  local extra=("--labels=$LABEL_KEY=$LABEL_VALUE")
  [ -z "$capacity" ] || extra+=("--$capacity")
  if ((slices > 1)); then
    # Several slices exist only as one queued resource; its slices are NAME-0 ... NAME-(N-1).
    gcloud_do compute tpus queued-resources create "$name" --zone="$zone" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" \
      --node-count="$slices" --node-prefix="$name" "${extra[@]}"
    ((dry_run)) || echo "queued; it is ready when this says ACTIVE:" \
      "gcloud compute tpus queued-resources describe $name --zone=$zone --format='value(state.state)'" >&2
  else
    gcloud_do compute tpus tpu-vm create "$name" --zone="$zone" \
      --accelerator-type="$accelerator_type" --version="$runtime_version" "${extra[@]}"
  fi
}

# The workers get either a commit, cloned from --repo-url, or this checkout's files as they are.
setup() {
  local git_dir="" dirty="" head="" tarball="" tarball_name=""
  if [ -z "$repo_url" ] || [ -z "$commit" ]; then
    git_dir=$(git -C "$repo" rev-parse --show-toplevel 2>/dev/null) ||
      die "$repo is not a git checkout; pass --repo-url and --commit to clone one on the workers"
    [ -z "$(git -C "$git_dir" status --porcelain)" ] || dirty=1
    if [ -n "$dirty" ] && ((!allow_dirty)); then
      die "the checkout at $git_dir has uncommitted changes; commit them, or pass --allow-dirty to use it as it is"
    fi
    head=$(git -C "$git_dir" rev-parse HEAD)
  fi
  if [ -z "$jax_version" ]; then
    jax_version=$(sed -n 's/^jax==\([0-9][0-9a-z.]*\).*/\1/p' "$repo/requirements.txt" 2>/dev/null | head -n 1)
    [ -n "$jax_version" ] || die "no jax== pin in $repo/requirements.txt; pass --jax-version"
  fi
  if [ -z "$repo_url" ]; then
    tarball_name="llama2_jax-${head:0:12}${dirty:+-dirty}.tar.gz"
    tarball="${TMPDIR:-/tmp}/$tarball_name"
  fi

  local remote=("set -e" "rd=$(quote "$remote_dir")")
  # The copy goes once it is unpacked, or if anything fails.
  [ -z "$tarball_name" ] || remote+=("tarball=\"\$PWD/$tarball_name\"" "trap 'rm -f \"\$tarball\"' EXIT")
  remote+=(
    "[ ! -e \"\$rd\" ] || [ -f \"\$rd/$MARKER\" ] || fail \"\$rd exists and launch/tpu_pod.sh setup did not make it; pass another --remote-dir\""
    "$(refuse_if_running "\$rd")"
    "mkdir -p \"\$rd\"")
  # Everything but the virtualenv and the logs is replaced.
  local clear="find \"\$rd\" -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +"
  if [ -n "$repo_url" ]; then
    commit=${commit:-$head}
    local url
    url=$(quote "$repo_url")
    remote+=(
      "if [ ! -d \"\$rd/.git\" ]; then $clear; git init --quiet \"\$rd\"; git -C \"\$rd\" remote add origin $url"
      "else git -C \"\$rd\" remote set-url origin $url; fi"
      "git -C \"\$rd\" fetch --quiet origin '+refs/heads/*:refs/remotes/origin/*'"
      "git -C \"\$rd\" checkout --quiet --force --detach $(quote "$commit")"
      "echo $(quote "$commit") > \"\$rd/$MARKER\"")
  else
    remote+=(
      "$clear"
      "tar -xzf \"\$tarball\" -C \"\$rd\""
      "echo $(quote "$head${dirty:+ with uncommitted changes}") > \"\$rd/$MARKER\"")
  fi
  local venv_package="${python##*/}-venv" py
  py=$(quote "$python")
  remote+=(
    "cd \"\$rd\""
    "$py -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail 'llama2_jax needs Python 3.10 or newer; pass --python'"
    # Ubuntu's python3 has no venv module until its -venv package is installed.
    "if [ ! -x .venv/bin/pip ] && ! $py -m venv .venv; then sudo apt-get update -qq"
    "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(quote "$venv_package")"
    "$py -m venv .venv; fi"
    ".venv/bin/pip install --quiet --upgrade pip"
    ".venv/bin/pip install --quiet -r requirements.txt $(quote "jax[tpu]==$jax_version") gcsfs"
    "echo \"\$(hostname): ready in \$PWD at \$(cat $MARKER)\"")

  require_owned
  if [ -n "$tarball" ]; then
    if ((!dry_run)); then
      # Expanded now on purpose: $tarball is local to this function, gone when the trap runs.
      # shellcheck disable=SC2064
      trap "rm -f $(quote "$tarball")" EXIT
      # The files git knows (tracked, and untracked but not ignored) as they are on disk: exactly
      # HEAD when the checkout is clean.
      git -C "$git_dir" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do
          if [ -e "$git_dir/$file" ]; then printf '%s\0' "$file"; fi
        done |
        tar -C "$git_dir" -czf "$tarball" --null -T -
    fi
    copy_to_workers "$tarball" "$tarball_name"
  fi
  on_workers "${remote[@]}"
}

run() {
  if ((slices > 1)); then
    local word has_config=0 has_dcn=0
    for word in "${command[@]}"; do
      case $word in
        --config | --config=*) has_config=1 ;;
        --config.mesh.dcn_*) has_dcn=1 ;;
      esac
    done
    # Slices talk over the data-center network, far slower than the chips' own links: only the
    # data axis, which exchanges gradients once per step, goes across them.
    if ((has_config && !has_dcn)); then command+=("--config.mesh.dcn_data=$slices"); fi
  fi
  local remote=(
    "set -e" "cd $(quote "$remote_dir") || fail 'no $(quote "$remote_dir") here; run setup first'"
    "[ -x .venv/bin/python ] || fail \"no virtualenv in \$PWD; run setup first\""
    "mkdir -p logs"
    "$(refuse_if_running .)"
    "job=($(quote_all "${command[@]}"))"
    "{ printf '=== %s %s:' \"\$(date -u +%FT%TZ)\" \"\$(cat $MARKER)\"; printf ' %q' \"\${job[@]}\"; echo; } >> $LOG"
    # setsid: its own session and process group, so it outlives the ssh session and stop can
    # find everything it started; nohup and the redirections detach it from the terminal.
    "PATH=\"\$PWD/.venv/bin:\$PATH\" VIRTUAL_ENV=\"\$PWD/.venv\" setsid nohup \"\${job[@]}\" >> $LOG 2>&1 < /dev/null &"
    "echo \$! > $PID_FILE"
    "echo \"\$(hostname): started process group \$! (log: \$PWD/$LOG)\"")
  require_owned
  on_workers "${remote[@]}"
}

logs() {
  local tail_flags="-n $lines"
  ((!follow)) || tail_flags+=" -F"
  local remote=(
    "log=$(quote "$remote_dir")/$LOG"
    "[ -f \"\$log\" ] || fail \"no \$log; start a command with run\""
    "tail $tail_flags \"\$log\" | sed -u \"s/^/[\$(hostname)] /\"")
  on_workers "${remote[@]}"
}

stop() {
  local remote=(
    "pid_file=$(quote "$remote_dir")/$PID_FILE"
    "if [ ! -f \"\$pid_file\" ] || ! running \"\$(cat \"\$pid_file\")\"; then echo \"\$(hostname): nothing running\"; exit 0; fi"
    "group=\$(cat \"\$pid_file\")"
    # SIGTERM to the command alone: it checkpoints and exits, and its helper processes (data
    # loading) must keep serving it until then.
    "kill -TERM \"\$group\""
    "echo \"\$(hostname): sent SIGTERM; waiting up to $wait_seconds s for it to checkpoint and exit\""
    "for _ in \$(seq $wait_seconds); do running \"\$group\" || break; sleep 1; done"
    "if running \"\$group\"; then kill -KILL -- \"-\$group\""
    "echo \"\$(hostname): still running after $wait_seconds s, killed; a rerun resumes from the checkpoint before\" >&2"
    "else echo \"\$(hostname): stopped\"; fi"
    "rm -f \"\$pid_file\"")
  require_owned
  on_workers "${remote[@]}"
}

delete() {
  require_owned
  if ((slices > 1)); then
    # --force deletes the slices with the request.
    gcloud_do compute tpus queued-resources delete "$name" --zone="$zone" --force
  else
    gcloud_do compute tpus tpu-vm delete "$name" --zone="$zone"
  fi
}

"$subcommand"
