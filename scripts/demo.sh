#!/usr/bin/env bash
# scripts/demo.sh: THE end-to-end demo. Sends one real email through Herald
# on this machine and shows every step:
#   1. setup.sh + services.sh start (PostgreSQL, tansu broker, smtp-sink)
#   2. cargo build --release
#   3. herald migrate, herald topics ensure
#   4. herald serve in the background (log: .herald/logs/herald.log)
#   5. herald send --channel email --to demo@example.com ... --wait 30:
#      prints the request id, then the outcome events it waited for
#   6. the email as captured by smtp-sink in .herald/mail/
#   7. an excerpt of http://127.0.0.1:$HERALD_HTTP_PORT/metrics (herald_*)
#   8. stops herald serve with SIGTERM (also when a step fails)
#
# Usage: scripts/demo.sh [--help]
# Env: HERALD_HTTP_PORT (default 8080) for herald serve's HTTP listener;
#      HERALD_BIN=path/to/herald uses that binary instead of building one.
set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
-h | --help)
	print_help "$0"
	exit 0
	;;
"") ;;
*) die "unknown argument: $1 (see --help)" ;;
esac

HTTP_PORT=${HERALD_HTTP_PORT:-8080}
cd "$HERALD_REPO"

banner() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

banner "1. prerequisites and local services"
bash scripts/setup.sh
bash scripts/services.sh start
eval "$(bash scripts/services.sh env)"
export HERALD_HTTP__BIND=127.0.0.1:$HTTP_PORT
# The demo's webhook targets (if any) live on 127.0.0.1.
export HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS=true

if [ -n "${HERALD_BIN:-}" ]; then
	banner "2. using HERALD_BIN (no build)"
else
	banner "2. cargo build --release"
	cargo build --release --bin herald
	target_dir=$(cargo metadata --format-version 1 --no-deps |
		python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
	HERALD_BIN=$target_dir/release/herald
fi
[ -x "$HERALD_BIN" ] || die "herald binary not found at $HERALD_BIN"
log "binary: $HERALD_BIN"

banner "3. herald migrate; herald topics ensure"
"$HERALD_BIN" migrate
"$HERALD_BIN" topics ensure

banner "4. herald serve (background)"
if port_open "$HTTP_PORT"; then
	die "127.0.0.1:$HTTP_PORT is already in use (set HERALD_HTTP_PORT)"
fi
mkdir -p "$HERALD_HOME/logs"
HERALD_LOG=$HERALD_HOME/logs/herald.log
printf '\n==== %s demo: herald serve\n' "$(date -u +%FT%TZ)" >>"$HERALD_LOG"
"$HERALD_BIN" serve </dev/null >>"$HERALD_LOG" 2>&1 &
SERVE_PID=$!

stop_serve() {
	local i
	[ -n "${SERVE_PID:-}" ] || return 0
	if kill -0 "$SERVE_PID" 2>/dev/null; then
		log "stopping herald serve (SIGTERM to pid $SERVE_PID)"
		kill -TERM "$SERVE_PID" 2>/dev/null || true
		for ((i = 0; i < 120; i++)); do
			kill -0 "$SERVE_PID" 2>/dev/null || break
			sleep 0.25
		done
		if kill -0 "$SERVE_PID" 2>/dev/null; then
			warn "herald serve did not stop within 30 s: SIGKILL"
			kill -KILL "$SERVE_PID" 2>/dev/null || true
		fi
	fi
	local rc=0
	wait "$SERVE_PID" 2>/dev/null || rc=$?
	log "herald serve exited with status $rc (log: $HERALD_LOG)"
	SERVE_PID=""
}
on_exit() {
	local rc=$?
	stop_serve
	if [ "$rc" -ne 0 ] && [ -s "$HERALD_LOG" ]; then
		warn "demo failed (status $rc); last lines of $HERALD_LOG:"
		tail -n 30 "$HERALD_LOG" >&2
	fi
}
trap on_exit EXIT

log "pid $SERVE_PID, log $HERALD_LOG; waiting for http://127.0.0.1:$HTTP_PORT/readyz"
ready=0
for ((i = 0; i < 120; i++)); do
	kill -0 "$SERVE_PID" 2>/dev/null || die "herald serve exited at start"
	if curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/readyz" 2>/dev/null; then
		ready=1
		break
	fi
	sleep 0.5
done
[ "$ready" -eq 1 ] || die "herald serve not ready after 60 s"
log "herald serve is ready"

banner "5. herald send (waits for the outcome)"
marker=$(mktemp)
"$HERALD_BIN" send --channel email --to demo@example.com \
	--subject "Hello from Herald" --text "It works" --wait 30

banner "6. the email as received by smtp-sink ($HERALD_HOME/mail/)"
mail_file=""
for ((i = 0; i < 40; i++)); do
	mail_file=$(find -L "$HERALD_HOME/mail" -maxdepth 1 -type f -newer "$marker" 2>/dev/null | sort | tail -n 1)
	[ -n "$mail_file" ] && break
	sleep 0.25
done
rm -f "$marker"
if [ -n "$mail_file" ]; then
	log "$mail_file:"
	cat "$mail_file"
else
	die "no new message in $HERALD_HOME/mail/ (see $HERALD_LOG and $HERALD_HOME/logs/smtp-sink.log)"
fi

banner "7. metrics (herald_*)"
metrics=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics") || warn "GET /metrics failed"
printf '%s\n' "${metrics:-}" | awk '/^herald_/ && n++ < 40' | grep . || warn "no herald_ metrics found"

banner "8. stop"
stop_serve
log "demo complete"
