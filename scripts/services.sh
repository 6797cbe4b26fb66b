#!/usr/bin/env bash
# scripts/services.sh: local services for development, tests and the demo,
# all bound to 127.0.0.1, all state under $HERALD_HOME (default <repo>/.herald).
#
#   PostgreSQL  127.0.0.1:$HERALD_PG_PORT     (55432) throwaway cluster in .herald/pg,
#               trust auth, superuser postgres, fsync off (test data only)
#   tansu       127.0.0.1:$HERALD_BROKER_PORT (19092) Kafka-protocol broker,
#               sqlite storage in .herald/tansu/tansu.db
#   smtp-sink   127.0.0.1:$HERALD_SMTP_PORT   (2525) postfix's SMTP sink, one
#               file per received message in .herald/mail/
# Logs: .herald/logs/. Pid files: .herald/run/.
#
# Usage: scripts/services.sh start|stop|status|env|reset [--help]
#   start   start what is not running (idempotent); waits until each is ready
#   stop    stop all three
#   status  one line per service; exit 1 if any is down
#   env     print `export` lines for tests and herald: eval "$(scripts/services.sh env)"
#   reset   stop, then delete all local state (databases, topics, mail)
# A port already served by a process this HERALD_HOME did not start (another
# checkout's services) is used as it is, with a warning; `stop` leaves it alone.
set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUN_DIR=$HERALD_HOME/run
LOG_DIR=$HERALD_HOME/logs
# Used when an unprivileged service user (postgres, nobody) cannot reach
# HERALD_HOME, e.g. a checkout under /root (mode 700): the state then lives
# here and HERALD_HOME/<name> is a symlink to it.
FALLBACK_ROOT=/var/tmp/herald-$(printf '%s' "$HERALD_HOME" | cksum | cut -d' ' -f1)

# ---------------------------------------------------------------- helpers

# Runs a command as OS user $1 when we are root (initdb refuses root);
# as ourselves otherwise.
as_user() {
	local user=$1
	shift
	if is_root; then
		# From /, as the user may not be able to enter our working directory.
		(cd / && runuser -u "$user" -- "$@")
	else
		"$@"
	fi
}

# state_dir NAME OWNER [MAXLEN]: prints a directory for service state that OS
# user OWNER can use, HERALD_HOME/NAME or a FALLBACK_ROOT directory linked
# from there. MAXLEN bounds the path length (unix socket paths are limited).
state_dir() {
	local name=$1 owner=$2 maxlen=${3:-4000} link real
	link=$HERALD_HOME/$name
	if [ -L "$link" ]; then
		real=$(readlink "$link")
		mkdir -p "$real"
	elif [ -d "$link" ]; then
		real=$link
	else
		mkdir -p "$link"
		real=$link
		if [ "${#link}" -gt "$maxlen" ] || { is_root && ! runuser -u "$owner" -- test -x "$link"; }; then
			rmdir "$link"
			real=$FALLBACK_ROOT/$name
			# A missing link means HERALD_HOME was reset: start from scratch.
			rm -rf "$real"
			mkdir -p "$real"
			ln -s "$real" "$link"
			log "$owner cannot use $link: keeping $name state in $real (linked from $link)"
		fi
	fi
	if is_root; then
		chown "$owner:" "$real"
	fi
	printf '%s\n' "$real"
}

# stop_pidfile NAME FILE: SIGTERM, wait up to 10 s, then SIGKILL.
stop_pidfile() {
	local name=$1 file=$2 pid i
	if ! pid_alive "$file" "$name"; then
		rm -f "$file"
		log "$name: not running"
		return 0
	fi
	pid=$(cat "$file")
	log "$name: stopping (pid $pid)"
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 40; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.25
	done
	if kill -0 "$pid" 2>/dev/null; then
		warn "$name: still running after 10 s, sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$file"
}

# start_background NAME PIDFILE LOGFILE CMD...: starts CMD detached (own
# session, no terminal, output to LOGFILE) and records its pid.
start_background() {
	local name=$1 pidfile=$2 logfile=$3
	shift 3
	printf '\n==== %s starting %s\n' "$(date -u +%FT%TZ)" "$name" >>"$logfile"
	setsid "$@" </dev/null >>"$logfile" 2>&1 &
	printf '%s\n' "$!" >"$pidfile"
}

# ---------------------------------------------------------------- PostgreSQL

PG_BINDIR=""
PG_BASE=""

pg_init_paths() {
	PG_BINDIR=$(find_pg_bindir) || die "PostgreSQL binaries not found: run scripts/setup.sh"
	# <base>/sock/.s.PGSQL.<port> must stay below the 107-byte socket path limit.
	PG_BASE=$(state_dir pg postgres 80)
}

pg_running() {
	[ -f "$PG_BASE/data/postmaster.pid" ] &&
		as_user postgres "$PG_BINDIR/pg_ctl" -D "$PG_BASE/data" status >/dev/null 2>&1
}

pg_ready() {
	"$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$HERALD_PG_PORT" -U postgres -d postgres -t 2
}

pg_psql() {
	"$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$HERALD_PG_PORT" -U postgres -d postgres "$@"
}

# Creates the `herald` database (used by HERALD_DATABASE__URL) if missing.
pg_ensure_herald_db() {
	local exists
	exists=$(pg_psql -tA -c "SELECT 1 FROM pg_database WHERE datname = 'herald'") ||
		die "postgres: cannot query 127.0.0.1:$HERALD_PG_PORT"
	if [ "$exists" != 1 ]; then
		log "postgres: creating database herald"
		pg_psql -c "CREATE DATABASE herald"
	fi
}

pg_start() {
	pg_init_paths
	local data=$PG_BASE/data sock=$PG_BASE/sock i
	if pg_running; then
		log "postgres: already running on 127.0.0.1:$HERALD_PG_PORT"
		pg_ensure_herald_db
		return 0
	fi
	if port_open "$HERALD_PG_PORT"; then
		pg_ready || die "port $HERALD_PG_PORT is taken by something that is not PostgreSQL (set HERALD_PG_PORT)"
		warn "postgres: 127.0.0.1:$HERALD_PG_PORT is served by a PostgreSQL this HERALD_HOME did not start; using it"
		pg_ensure_herald_db
		return 0
	fi
	if [ ! -s "$data/PG_VERSION" ]; then
		log "postgres: initdb in $data ($("$PG_BINDIR/postgres" --version))"
		as_user postgres mkdir -p "$data"
		as_user postgres "$PG_BINDIR/initdb" -D "$data" -U postgres --auth=trust \
			-E UTF8 --locale=C >"$PG_BASE/initdb.log" 2>&1 ||
			die "postgres: initdb failed, see $PG_BASE/initdb.log"
		printf "\n# Herald's local settings (scripts/services.sh)\ninclude_if_exists = 'herald.conf'\n" |
			as_user postgres tee -a "$data/postgresql.conf" >/dev/null
	fi
	as_user postgres mkdir -p "$sock"
	# Rewritten at every start so that HERALD_PG_PORT changes take effect.
	as_user postgres tee "$data/herald.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $HERALD_PG_PORT
unix_socket_directories = '$sock'
max_connections = 300
shared_buffers = 128MB
# Throwaway test data: durability off for speed.
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
	log "postgres: starting on 127.0.0.1:$HERALD_PG_PORT (log: $PG_BASE/postgres.log)"
	as_user postgres "$PG_BINDIR/pg_ctl" -D "$data" -l "$PG_BASE/postgres.log" -w -t 60 start >/dev/null ||
		die "postgres: failed to start, see $PG_BASE/postgres.log"
	for ((i = 0; i < 60; i++)); do
		pg_ready && break
		sleep 0.5
	done
	pg_ready || die "postgres: not ready after 30 s, see $PG_BASE/postgres.log"
	ln -sfn "$PG_BASE/postgres.log" "$LOG_DIR/postgres.log"
	pg_ensure_herald_db
	pg_drop_test_leftovers
	log "postgres: ready"
}

# Drops the databases earlier test runs left behind: each test creates a
# random one (herald_it_*, _faults_, _store_, _reg_, _providers_) and never drops
# it, and over many runs they fill the disk. Only called right after this
# script started the cluster, so no test can be using them.
pg_drop_test_leftovers() {
	local dbs db
	dbs=$(pg_psql -tA -c "SELECT datname FROM pg_database WHERE datname ~ '^herald_(it|faults|store|reg|providers)_[0-9a-f]+$'") ||
		return 0
	[ -n "$dbs" ] || return 0
	for db in $dbs; do
		pg_psql -c "DROP DATABASE IF EXISTS \"$db\"" || warn "postgres: could not drop $db"
	done
	log "postgres: dropped $(wc -w <<<"$dbs") databases left by earlier test runs"
}

pg_stop() {
	pg_init_paths
	if pg_running; then
		log "postgres: stopping"
		as_user postgres "$PG_BINDIR/pg_ctl" -D "$PG_BASE/data" -m fast -w -t 60 stop >/dev/null
	else
		log "postgres: not running"
	fi
}

pg_status() {
	pg_init_paths
	if pg_running && pg_ready; then
		echo "postgres   running   127.0.0.1:$HERALD_PG_PORT  data $PG_BASE/data"
	elif pg_ready; then
		echo "postgres   external  127.0.0.1:$HERALD_PG_PORT  (not started by this HERALD_HOME)"
	else
		echo "postgres   stopped"
		return 1
	fi
}

# ---------------------------------------------------------------- tansu

TANSU_PID=$RUN_DIR/tansu.pid

tansu_start() {
	local tansu
	if pid_alive "$TANSU_PID" tansu; then
		log "tansu: already running on 127.0.0.1:$HERALD_BROKER_PORT"
		return 0
	fi
	if port_open "$HERALD_BROKER_PORT"; then
		warn "tansu: 127.0.0.1:$HERALD_BROKER_PORT is served by a process this HERALD_HOME did not start; using it"
		return 0
	fi
	tansu=$(find_tansu) || die "tansu is not installed: run scripts/setup.sh"
	mkdir -p "$HERALD_HOME/tansu"
	log "tansu: starting on 127.0.0.1:$HERALD_BROKER_PORT (log: $LOG_DIR/tansu.log)"
	# tansu resolves sqlite://HOST/PATH relative to its working directory
	# (even with an absolute path), so it runs in HERALD_HOME and the URL
	# names tansu/tansu.db.
	(
		cd "$HERALD_HOME"
		start_background tansu "$TANSU_PID" "$LOG_DIR/tansu.log" \
			"$tansu" broker \
			--listener-url "tcp://127.0.0.1:$HERALD_BROKER_PORT" \
			--advertised-listener-url "tcp://127.0.0.1:$HERALD_BROKER_PORT" \
			--storage-engine "sqlite://tansu/tansu.db"
	)
	local i
	for ((i = 0; i < 120; i++)); do
		port_open "$HERALD_BROKER_PORT" && break
		pid_alive "$TANSU_PID" || die "tansu: exited at start, see $LOG_DIR/tansu.log"
		sleep 0.25
	done
	wait_for_port "$HERALD_BROKER_PORT" 1 tansu
	# tansu 0.6 scans its whole header table for every fetched record; the
	# missing index makes the broker slow down as outcomes accumulate.
	python3 "$HERALD_REPO/scripts/tansu-index.py" "$HERALD_HOME/tansu/tansu.db" ||
		warn "tansu: header index not added; fetches will slow down as the broker fills"
	log "tansu: ready"
}

tansu_status() {
	if pid_alive "$TANSU_PID" tansu && port_open "$HERALD_BROKER_PORT"; then
		echo "tansu      running   127.0.0.1:$HERALD_BROKER_PORT  pid $(cat "$TANSU_PID")"
	elif port_open "$HERALD_BROKER_PORT"; then
		echo "tansu      external  127.0.0.1:$HERALD_BROKER_PORT  (not started by this HERALD_HOME)"
	else
		echo "tansu      stopped"
		return 1
	fi
}

# ---------------------------------------------------------------- smtp-sink

SINK_PID=$RUN_DIR/smtp-sink.pid
SMTP_SINK=/usr/sbin/smtp-sink

sink_start() {
	local mail_dir user_args=()
	if pid_alive "$SINK_PID" smtp-sink; then
		log "smtp-sink: already running on 127.0.0.1:$HERALD_SMTP_PORT"
		return 0
	fi
	if port_open "$HERALD_SMTP_PORT"; then
		warn "smtp-sink: 127.0.0.1:$HERALD_SMTP_PORT is served by a process this HERALD_HOME did not start; using it"
		return 0
	fi
	[ -x "$SMTP_SINK" ] || die "$SMTP_SINK not found: run scripts/setup.sh"
	# As root, smtp-sink must drop privileges (-u); it then writes as nobody.
	if is_root; then
		user_args=(-u nobody)
		mail_dir=$(state_dir mail nobody)
	else
		mail_dir=$(state_dir mail "$(id -un)")
	fi
	log "smtp-sink: starting on 127.0.0.1:$HERALD_SMTP_PORT, mail to $HERALD_HOME/mail/"
	# -d: one file per message, named <UTC time>.<random hex>.
	start_background smtp-sink "$SINK_PID" "$LOG_DIR/smtp-sink.log" \
		env TZ=UTC "$SMTP_SINK" "${user_args[@]}" -h herald-sink \
		-d "$mail_dir/%Y%m%d-%H%M%S." "127.0.0.1:$HERALD_SMTP_PORT" 1024
	local i
	for ((i = 0; i < 40; i++)); do
		port_open "$HERALD_SMTP_PORT" && break
		pid_alive "$SINK_PID" || die "smtp-sink: exited at start, see $LOG_DIR/smtp-sink.log"
		sleep 0.25
	done
	wait_for_port "$HERALD_SMTP_PORT" 1 smtp-sink
	log "smtp-sink: ready"
}

sink_status() {
	if pid_alive "$SINK_PID" smtp-sink && port_open "$HERALD_SMTP_PORT"; then
		echo "smtp-sink  running   127.0.0.1:$HERALD_SMTP_PORT   pid $(cat "$SINK_PID")  mail $HERALD_HOME/mail/"
	elif port_open "$HERALD_SMTP_PORT"; then
		echo "smtp-sink  external  127.0.0.1:$HERALD_SMTP_PORT   (not started by this HERALD_HOME)"
	else
		echo "smtp-sink  stopped"
		return 1
	fi
}

# ---------------------------------------------------------------- commands

cmd_start() {
	mkdir -p "$HERALD_HOME" "$RUN_DIR" "$LOG_DIR"
	pg_start
	tansu_start
	sink_start
	log "all services up (HERALD_HOME=$HERALD_HOME)"
}

cmd_stop() {
	stop_pidfile smtp-sink "$SINK_PID"
	stop_pidfile tansu "$TANSU_PID"
	if [ -e "$HERALD_HOME/pg" ]; then
		pg_stop
	else
		log "postgres: no cluster in $HERALD_HOME"
	fi
}

cmd_status() {
	local rc=0
	if [ -e "$HERALD_HOME/pg" ]; then
		pg_status || rc=1
	else
		echo "postgres   stopped   (no cluster yet)"
		rc=1
	fi
	tansu_status || rc=1
	sink_status || rc=1
	return "$rc"
}

cmd_env() {
	cat <<EOF
export HERALD_TEST_BROKERS=127.0.0.1:$HERALD_BROKER_PORT
export HERALD_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$HERALD_PG_PORT/postgres
export HERALD_KAFKA__BROKERS=127.0.0.1:$HERALD_BROKER_PORT
export HERALD_DATABASE__URL=postgres://postgres@127.0.0.1:$HERALD_PG_PORT/herald
export HERALD_SMTP__HOST=127.0.0.1
export HERALD_SMTP__PORT=$HERALD_SMTP_PORT
EOF
}

cmd_reset() {
	cmd_stop
	log "deleting $HERALD_HOME"
	local name target
	for name in pg mail; do
		if [ -L "$HERALD_HOME/$name" ]; then
			target=$(readlink "$HERALD_HOME/$name")
			log "deleting $target"
			rm -rf "$target"
		fi
	done
	rm -rf "$HERALD_HOME"
	rmdir "$FALLBACK_ROOT" 2>/dev/null || true
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
reset) cmd_reset ;;
-h | --help)
	print_help "$0"
	;;
*)
	print_help "$0" >&2
	exit 2
	;;
esac
