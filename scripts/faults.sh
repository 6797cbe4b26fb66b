#!/usr/bin/env bash
# scripts/faults.sh: the fault suite, long variant (see docs/faults.md).
# Starts the local services (services.sh start), then runs
#   HERALD_FAULTS_FULL=1 cargo test --test faults -- --include-ignored --skip probe_ --test-threads=1
#   HERALD_FUZZ_CASES=${HERALD_FUZZ_CASES:-20000} cargo test --test fuzz
# The long variant: 10 SIGKILLs during one load, 10,000 hostile requests,
# three PostgreSQL crashes, a broker pause plus a broker kill+restart, larger
# sink-failure loads, 6,000 requests for each two-instance scenario (one
# member leaves gracefully / one is SIGKILLed and restarted). Scenarios run one at a time (they start their own
# brokers, clusters and Herald processes). The fast variant is part of the
# normal suite: `cargo test --test faults` (or scripts/test.sh).
#
# Herald's logs are kept under $HERALD_FAULTS_LOG_DIR (default
# .herald/faults-logs/<test>/) for inspection after a failure.
#
# Usage: scripts/faults.sh [--help] [FILTER...]   (test name filters for the
#        faults run, e.g. scripts/faults.sh hostile)
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
bash scripts/services.sh start
eval "$(bash scripts/services.sh env)"
export HERALD_FAULTS_FULL=1
export HERALD_FAULTS_LOG_DIR=${HERALD_FAULTS_LOG_DIR:-$HERALD_HOME/faults-logs}
mkdir -p "$HERALD_FAULTS_LOG_DIR"
status=0
# The probe_* tests are measurements of the local broker, run by hand.
cargo test --test faults -- --include-ignored --skip probe_ --test-threads=1 --nocapture "$@" || status=1
HERALD_FUZZ_CASES=${HERALD_FUZZ_CASES:-20000} cargo test --test fuzz || status=1
exit $status
