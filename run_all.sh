#!/usr/bin/env bash
# Start the job queue: Redis (unless REDIS_URL is set), the server and WORKERS workers.
# Ctrl+C or SIGTERM stops everything it started and waits for it; nothing outlives it.
#
#   ./run_all.sh                                      # own Redis with AOF in ./data
#   REDIS_URL=redis://localhost:6379/0 WORKERS=4 ./run_all.sh
#
# Settings (environment): WORKERS (2), REDIS_URL (unset: start redis-server in DATA_DIR, on a
# unix socket there, so a Redis the machine already runs is never touched), DATA_DIR (./data),
# PYTHON (python3); HOST, PORT, JOB_HANDLER and the rest reach the programs themselves, which
# check them first (--check). Exit status: 0 stopped on request, 1 a child died on its own (it
# is named), 2 a bad setting or could not start.
#
# Each child runs in its own process group (set -m), so a terminal's Ctrl+C reaches this script
# alone, and each child is signalled exactly once: a worker treats a second signal as "stop
# now". Server and workers stop first (workers finish their job), Redis last.
set -uo pipefail
cd "$(dirname "$0")" || exit 2
WORKERS=${WORKERS:-2}
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-$PWD/data}

declare -A names=()  # pid -> what it is
redis_pid=""
say() { echo "run_all: $*" >&2; }

start() {  # start NAME COMMAND...: run it in the background, in its own process group
  local name=$1
  shift
  set -m
  "$@" &
  set +m
  names[$!]=$name
}

stop() {  # stop PID...: SIGTERM each, then wait until every one has exited
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  local pid
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # wait returns early on a signal
  done
}

shutdown() {  # shutdown STATUS: stop server and workers, then Redis, and exit
  local apps=()
  for pid in "${!names[@]}"; do [ "$pid" = "$redis_pid" ] || apps+=("$pid"); done
  # A second Ctrl+C or SIGTERM is passed on: workers give their job back and exit at once.
  trap 'say "stopping now"; kill -TERM ${apps[*]} 2>/dev/null' INT TERM
  say "stopping ${#apps[@]} process(es), then Redis"
  stop "${apps[@]}"
  [ -z "$redis_pid" ] || stop "$redis_pid"
  say "stopped"
  exit "$1"
}
# Settings are checked before anything starts: a bad one is one line and exit 2.
if ! [[ $WORKERS =~ ^[0-9]+$ ]] || ((10#$WORKERS < 1)); then
  say "WORKERS='$WORKERS' must be a whole number of at least 1"
  exit 2
fi
if ! command -v "$PYTHON" >/dev/null; then
  say "PYTHON='$PYTHON' is not a command that can be run"
  exit 2
fi
"$PYTHON" server.py --check && "$PYTHON" worker.py --check || exit 2  # they say what is wrong

trap 'shutdown 0' INT TERM

if [ -z "${REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    say "redis-server not found. Install it (Debian/Ubuntu: sudo apt-get install redis-server;" \
        "macOS: brew install redis), or run one (docker run -d -p 6379:6379 redis:7) and set" \
        "REDIS_URL=redis://localhost:6379/0"
    exit 2
  fi
  mkdir -p "$DATA_DIR" || exit 2
  DATA_DIR=$(cd "$DATA_DIR" && pwd)
  socket=$DATA_DIR/redis.sock
  if redis-cli -s "$socket" ping >/dev/null 2>&1; then
    say "a Redis already serves $socket: is another run_all.sh using $DATA_DIR?"
    exit 2
  fi
  start redis redis-server --port 0 --unixsocket "$socket" --unixsocketperm 700 \
    --dir "$DATA_DIR" --appendonly yes --appendfsync everysec --save "" \
    --maxmemory-policy noeviction \
    --logfile "$DATA_DIR/redis.log"
  redis_pid=$!
  until redis-cli -s "$socket" ping >/dev/null 2>&1; do
    if ! kill -0 "$redis_pid" 2>/dev/null; then
      say "redis-server did not start; see $DATA_DIR/redis.log"
      exit 2
    fi
    sleep 0.05
  done
  REDIS_URL=unix://$socket
  say "redis-server (pid $redis_pid): data and AOF in $DATA_DIR, socket $socket"
fi
export REDIS_URL

start server "$PYTHON" server.py
for i in $(seq "$WORKERS"); do start "worker $i" "$PYTHON" worker.py; done
say "server and $WORKERS worker(s) started; Ctrl+C stops everything"

wait -n -p died
status=$?
say "${names[$died]} (pid $died) exited on its own with status $status; stopping the rest"
unset "names[$died]"
[ "$died" != "$redis_pid" ] || redis_pid=""
shutdown 1
