# shellcheck shell=bash
# Helpers shared by Herald's scripts (sourced, never run on its own): paths,
# ports, logging, finding tansu and the PostgreSQL binaries, waiting for ports.
#
# Every script that sources this file gets:
#   HERALD_REPO         the repository root (this file's parent directory)
#   HERALD_HOME         local state for services (default <repo>/.herald)
#   HERALD_PG_PORT      PostgreSQL port      (default 55432)
#   HERALD_BROKER_PORT  tansu (Kafka) port   (default 19092)
#   HERALD_SMTP_PORT    smtp-sink port       (default 2525)

HERALD_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERALD_HOME=${HERALD_HOME:-$HERALD_REPO/.herald}
case "$HERALD_HOME" in
/*) ;;
*) HERALD_HOME=$PWD/$HERALD_HOME ;;
esac
HERALD_PG_PORT=${HERALD_PG_PORT:-55432}
HERALD_BROKER_PORT=${HERALD_BROKER_PORT:-19092}
HERALD_SMTP_PORT=${HERALD_SMTP_PORT:-2525}
export HERALD_REPO HERALD_HOME HERALD_PG_PORT HERALD_BROKER_PORT HERALD_SMTP_PORT

# cargo (and what `cargo install` puts next to it) and the sbin directories
# (runuser, smtp-sink) may not be on PATH in a non-login shell such as CI's.
CARGO_BIN_DIR=${CARGO_HOME:-${HOME:-/root}/.cargo}/bin
for _dir in "$CARGO_BIN_DIR" /usr/local/sbin /usr/sbin /sbin; do
	case ":$PATH:" in
	*":$_dir:"*) ;;
	*) if [ -d "$_dir" ]; then PATH=$PATH:$_dir; fi ;;
	esac
done
unset _dir
export PATH

# The tansu release we install and run (see docs/operations.md).
# shellcheck disable=SC2034 # used by the scripts that source this file
TANSU_VERSION=0.6.0

# Name shown in front of every log line.
HERALD_SCRIPT=${HERALD_SCRIPT:-$(basename "${BASH_SOURCE[1]:-$0}" .sh)}

# Log lines go to stderr so that stdout stays clean for `services.sh env`.
log() { printf '[%s] %s\n' "$HERALD_SCRIPT" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$HERALD_SCRIPT" "$*" >&2; }
die() {
	printf '[%s] ERROR: %s\n' "$HERALD_SCRIPT" "$*" >&2
	exit 1
}

# Prints the comment block at the top of a script (line 2 up to the first
# line that is not a comment) as its --help text.
print_help() {
	awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Prints the path of the tansu binary, or nothing (status 1) if not installed.
find_tansu() {
	local cargo_bin="$CARGO_BIN_DIR/tansu"
	if command -v tansu >/dev/null 2>&1; then
		command -v tansu
	elif [ -x "$cargo_bin" ]; then
		printf '%s\n' "$cargo_bin"
	else
		return 1
	fi
}

# Prints the directory holding initdb/pg_ctl/pg_isready: PATH first, then the
# newest /usr/lib/postgresql/<version>/bin. Status 1 if none is found.
find_pg_bindir() {
	local initdb dir
	if initdb=$(command -v initdb 2>/dev/null) && [ -n "$initdb" ]; then
		dir=$(dirname "$(readlink -f "$initdb")")
		if [ -x "$dir/pg_ctl" ] && [ -x "$dir/pg_isready" ]; then
			printf '%s\n' "$dir"
			return 0
		fi
	fi
	dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null |
		sort -t/ -k5,5n | tail -n 1)
	if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
		printf '%s\n' "$dir"
		return 0
	fi
	return 1
}

# port_open PORT: true if something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_for_port PORT SECONDS NAME: waits until the port accepts connections.
wait_for_port() {
	local port=$1 timeout=$2 name=$3 i
	for ((i = 0; i < timeout * 4; i++)); do
		if port_open "$port"; then
			return 0
		fi
		sleep 0.25
	done
	die "$name did not accept connections on 127.0.0.1:$port within ${timeout}s"
}

# pid_alive FILE [NAME]: true if FILE holds the pid of a running process
# (whose command line contains NAME, if given: guards against reused pids).
pid_alive() {
	local pid
	[ -f "$1" ] || return 1
	pid=$(cat "$1" 2>/dev/null) || return 1
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
	if [ -n "${2:-}" ]; then
		tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
	fi
}
