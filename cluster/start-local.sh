#!/usr/bin/env bash
# A Ray cluster on this one machine, for trying the cluster path before a real one: a head node plus
# worker nodes, each its own raylet, the way separate machines would join.
#
#   cluster/start-local.sh [start] [--workers N] [--worker-cpus C] [--head-cpus C] [--port P] [--dashboard-port P]
#   cluster/start-local.sh status
#   cluster/start-local.sh stop             (or cluster/stop-local.sh)
#
# Then, from the repository root:
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/distill.py storage_root=$PWD/runs
#
# Defaults: 2 workers splitting this machine's cores (at least 2 CPUs each), a head with 0 CPUs (it runs
# the GCS, the dashboard and the job's driver, as on a real cluster), GCS port 6379, dashboard 8265.
# Every option also reads an environment variable: KDLIB_LOCAL_WORKERS, KDLIB_LOCAL_WORKER_CPUS,
# KDLIB_LOCAL_HEAD_CPUS, KDLIB_LOCAL_PORT, KDLIB_LOCAL_DASHBOARD_PORT, and KDLIB_LOCAL_OBJECT_STORE_MB
# (object store per node, default 1024).
#
# Token authentication is on: the nodes and the Jobs CLI use the token in ~/.ray/auth_token (made here if
# missing); RAY_AUTH_MODE=token makes the CLI send it. Each node is started with `ray start --block` in
# its own process group, and stop ends exactly those groups (their pids are in $KDLIB_LOCAL_STATE_DIR,
# default /tmp/kdlib-local-cluster-$USER), leaving any other Ray on this machine alone.
set -euo pipefail

cmd=start
if [[ $# -gt 0 && $1 != -* ]]; then cmd=$1; shift; fi

ncores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
workers=${KDLIB_LOCAL_WORKERS:-2}
worker_cpus=${KDLIB_LOCAL_WORKER_CPUS:-}
head_cpus=${KDLIB_LOCAL_HEAD_CPUS:-0}
port=${KDLIB_LOCAL_PORT:-6379}
dashboard_port=${KDLIB_LOCAL_DASHBOARD_PORT:-8265}
object_store_mb=${KDLIB_LOCAL_OBJECT_STORE_MB:-1024}
state_dir=${KDLIB_LOCAL_STATE_DIR:-/tmp/kdlib-local-cluster-${USER:-$(id -u)}}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --workers) workers=$2; shift 2 ;;
    --worker-cpus) worker_cpus=$2; shift 2 ;;
    --head-cpus) head_cpus=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dashboard-port) dashboard_port=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z $worker_cpus ]]; then
  # At least 2 each: the configs size their actors and Train workers for 2-CPU nodes (these are logical
  # CPUs; more than the machine has only means they share its cores).
  worker_cpus=$(( ncores / (workers > 0 ? workers : 1) ))
  (( worker_cpus >= 2 )) || worker_cpus=2
fi

ray_bin=$(command -v ray || true)
if [[ -z $ray_bin ]]; then
  echo "ray is not on PATH: pip install -e . (from the repository root) first" >&2
  exit 1
fi

alive() { kill -0 "$1" 2>/dev/null; }

# Waits until a node's log says it started (ray start prints this before blocking), or fails with the log.
wait_started() {
  local pid=$1 log=$2 name=$3 deadline=$((SECONDS + 180))
  until grep -q "Ray runtime started" "$log" 2>/dev/null; do
    if ! alive "$pid"; then
      echo "$name failed to start; its log ($log):" >&2
      tail -n 40 "$log" >&2
      return 1
    fi
    if (( SECONDS > deadline )); then
      echo "$name did not start within 180 s; its log: $log" >&2
      return 1
    fi
    sleep 1
  done
}

# Starts `ray start --block ARGS` in its own process group (job control), records its pid.
launch() {
  local name=$1; shift
  local log=$state_dir/$name.log
  set -m
  PYTHONUNBUFFERED=1 "$ray_bin" start --block "$@" </dev/null >"$log" 2>&1 &
  local pid=$!
  set +m
  echo "$pid" >"$state_dir/$name.pid"
  wait_started "$pid" "$log" "$name" || return 1
  echo "  $name: pid $pid, log $log"
}

stop_cluster() {
  local found=0 pidfile pid name
  shopt -s nullglob
  # Workers first, then the head.
  for pidfile in "$state_dir"/worker-*.pid "$state_dir/head.pid"; do
    [[ -f $pidfile ]] || continue
    found=1
    pid=$(cat "$pidfile"); name=$(basename "$pidfile" .pid)
    if alive "$pid"; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 60); do alive "$pid" || break; sleep 0.5; done
      if alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
      echo "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
  done
  (( found )) || echo "no local cluster recorded in $state_dir"
}

case $cmd in
  start)
    mkdir -p "$state_dir"
    if [[ -f $state_dir/head.pid ]] && alive "$(cat "$state_dir/head.pid")"; then
      echo "a local cluster is already running (head pid $(cat "$state_dir/head.pid")); $0 stop first" >&2
      exit 1
    fi
    rm -f "$state_dir"/*.pid
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
    if [[ $RAY_AUTH_MODE == token ]]; then
      "$ray_bin" get-auth-token --generate >/dev/null   # ~/.ray/auth_token, kept if it exists
    fi
    object_store_bytes=$(( object_store_mb * 1024 * 1024 ))
    echo "starting a head (${head_cpus} CPUs) and ${workers} workers (${worker_cpus} CPUs each) on 127.0.0.1"
    launch head --head --port="$port" --node-ip-address=127.0.0.1 \
      --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --include-dashboard=true \
      --num-cpus="$head_cpus" --object-store-memory="$object_store_bytes" \
      --min-worker-port=20000 --max-worker-port=20999 || { stop_cluster; exit 1; }
    # Nodes on one machine must not share the per-node ports: each gets its own dashboard-agent port and
    # worker port range, and one log monitor (the head's) forwards every node's logs.
    for i in $(seq 1 "$workers"); do
      launch "worker-$i" --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 \
        --num-cpus="$worker_cpus" --object-store-memory="$object_store_bytes" \
        --dashboard-agent-listen-port=$((52365 + i)) \
        --min-worker-port=$((20000 + 1000 * i)) --max-worker-port=$((20999 + 1000 * i)) \
        --include-log-monitor=False || { stop_cluster; exit 1; }
    done
    cat <<EOF

Ray cluster up: head 127.0.0.1:$port, dashboard http://127.0.0.1:$dashboard_port
Submit the pipeline from the repository root (storage_root must be a path every node can reach; on one
machine any absolute path is):

  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$dashboard_port --working-dir . -- \\
      python jobs/distill.py storage_root=\$PWD/runs

  RAY_AUTH_MODE=token ray status --address 127.0.0.1:$port      # nodes and CPUs
  $0 stop
EOF
    ;;
  status)
    RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} "$ray_bin" status --address "127.0.0.1:$port"
    ;;
  stop)
    stop_cluster
    ;;
  *)
    echo "unknown command: $cmd (start, status or stop)" >&2
    exit 2
    ;;
esac
