#!/usr/bin/env bash
# scripts/setup.sh: install what Herald's build, tests and demo need, only
# what is missing, and say what it does. Safe to run again: a second run
# installs nothing.
#
#   - Debian packages: cmake, libcurl4-openssl-dev (librdkafka's build),
#     postgresql (throwaway test cluster), postfix (only its smtp-sink
#     binary; no system MTA is configured or started), nginx-light (HTTP sink
#     for benchmarks), python3, curl (demo). `apt-get update` runs once, and only if a
#     package must be installed. Services of newly installed packages are not
#     started (policy-rc.d), so nothing listens on 5432/25/80.
#   - the local Kafka-protocol broker `tansu` (crates.io, via cargo install),
#     if it is neither on PATH nor in ~/.cargo/bin. This build takes 15-30
#     minutes on 2 cores; it happens once per machine.
#
# Usage: scripts/setup.sh [--help]
# Needs root for apt-get (as root it runs it directly, otherwise via sudo).
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

APT_PACKAGES=(cmake libcurl4-openssl-dev postgresql postfix nginx-light python3 curl)

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

as_root() {
	if is_root; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo "$@"
	else
		die "need root to run: $*"
	fi
}

install_apt_packages() {
	local missing=() pkg added_policy=0
	for pkg in "${APT_PACKAGES[@]}"; do
		pkg_installed "$pkg" || missing+=("$pkg")
	done
	if [ ${#missing[@]} -eq 0 ]; then
		log "apt packages present: ${APT_PACKAGES[*]}"
		return 0
	fi
	command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}"
	log "installing missing apt packages: ${missing[*]}"

	export DEBIAN_FRONTEND=noninteractive
	if printf '%s\n' "${missing[@]}" | grep -qx postfix; then
		# We only use /usr/sbin/smtp-sink: no MTA configuration, no questions.
		log "preseeding postfix: main_mailer_type = No configuration"
		echo "postfix postfix/main_mailer_type select No configuration" |
			as_root debconf-set-selections
	fi
	# Keep apt from starting the packages' system services (a PostgreSQL
	# cluster on 5432, nginx on 80): we run our own instances on 127.0.0.1.
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
		as_root chmod 755 /usr/sbin/policy-rc.d
		added_policy=1
	fi
	local rc=0
	log "apt-get update"
	as_root apt-get update -qq || rc=$?
	if [ "$rc" -eq 0 ]; then
		log "apt-get install ${missing[*]}"
		as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
	fi
	if [ "$added_policy" -eq 1 ]; then
		as_root rm -f /usr/sbin/policy-rc.d
	fi
	[ "$rc" -eq 0 ] || die "apt-get failed (exit $rc)"
	log "apt packages installed"
}

check_tools() {
	command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (rustup) first"
	cargo clippy --version >/dev/null 2>&1 || warn "cargo clippy is missing (rustup component add clippy)"
	cargo fmt --version >/dev/null 2>&1 || warn "cargo fmt is missing (rustup component add rustfmt)"
	[ -x /usr/sbin/smtp-sink ] || die "/usr/sbin/smtp-sink missing although postfix is installed"
	find_pg_bindir >/dev/null || die "PostgreSQL binaries (initdb, pg_ctl) not found"
}

install_tansu() {
	local tansu
	if tansu=$(find_tansu); then
		log "tansu present: $tansu"
		return 0
	fi
	log "tansu not found: installing tansu $TANSU_VERSION with cargo install"
	log "this build takes 15-30 minutes on 2 cores (once per machine)"
	# Its own temporary target dir: a shared CARGO_TARGET_DIR would hold the
	# build lock of the project's builds for the whole install.
	env -u CARGO_TARGET_DIR cargo install tansu --version "$TANSU_VERSION" --locked \
		--no-default-features --features libsql
	tansu=$(find_tansu) || die "cargo install finished but tansu is not found"
	log "tansu installed: $tansu"
}

install_apt_packages
check_tools
install_tansu
log "setup complete"
