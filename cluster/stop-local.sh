#!/usr/bin/env bash
# Stops the Ray cluster cluster/start-local.sh started on this machine (only its nodes' process groups;
# other Ray processes on the machine are left alone). Same as `cluster/start-local.sh stop`.
set -euo pipefail
exec "$(dirname "$0")/start-local.sh" stop "$@"
