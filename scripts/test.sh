#!/usr/bin/env bash
# scripts/test.sh: THE test command. Installs what is missing (setup.sh),
# starts the local services (services.sh start), exports their addresses
# (HERALD_TEST_BROKERS, HERALD_TEST_DATABASE_URL, ...), then runs
#   cargo test --all-targets --no-fail-fast [ARGS...]
#   cargo clippy --all-targets -- -D warnings
#   cargo fmt --check
# All three always run; the exit status is non-zero if any of them failed.
# Services are left running afterwards (the next run is faster);
# `scripts/services.sh stop` stops them.
#
# Usage: scripts/test.sh [--help] [ARGS...]   (ARGS go to cargo test, e.g.
#        scripts/test.sh --test pipeline -- --nocapture)
set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
-h | --help)
	print_help "$0"
	exit 0
	;;
esac

cd "$HERALD_REPO"
started=$SECONDS

bash scripts/setup.sh
bash scripts/services.sh start
eval "$(bash scripts/services.sh env)"
log "test environment:"
bash scripts/services.sh env | sed 's/^/    /' >&2

# In CI every run is a fresh clone, so a target dir inside the clone would
# rebuild everything (librdkafka included) each time. A persistent one outside
# the clone lets a CI run on a machine that already built reuse the build.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ "${CI:-}" = "true" ]; then
	export CARGO_TARGET_DIR=/var/cache/herald-target
	mkdir -p "$CARGO_TARGET_DIR"
	log "CI: using the persistent CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
fi

failed=()
step() {
	local name=$1 t0=$SECONDS
	shift
	log "==> $name: $*"
	if "$@"; then
		log "<== $name: ok ($((SECONDS - t0)) s)"
	else
		log "<== $name: FAILED (exit $?, $((SECONDS - t0)) s)"
		failed+=("$name")
	fi
}

step test cargo test --all-targets --no-fail-fast "$@"
step clippy cargo clippy --all-targets -- -D warnings
step fmt cargo fmt --check

if [ ${#failed[@]} -gt 0 ]; then
	log "FAILED: ${failed[*]} (total $((SECONDS - started)) s)"
	exit 1
fi
log "all checks passed (total $((SECONDS - started)) s)"
