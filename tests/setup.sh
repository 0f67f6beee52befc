#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Install everything the build and the tests need on Debian bookworm.
# Run as root (or through sudo); safe to run again.
set -euo pipefail

pkgs=(
	build-essential cmake pkg-config
	liburing-dev zlib1g-dev libzstd-dev libssl-dev check nettle-dev
	qemu-utils python3 util-linux groff-base
	clang libclang-rt-14-dev	# the fuzz targets: libFuzzer is only recommended by clang
)

if [ "$(id -u)" -ne 0 ]; then
	echo "setup.sh: run as root (sudo ./tests/setup.sh)" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${pkgs[@]}"

# The end-to-end tests boot test kernels under qemu (kernel/ kit).
"$(dirname "$0")/../kernel/setup.sh"
# ...and fetches them once into kernel/cache (offline afterwards).
"$(dirname "$0")/../kernel/fetch.sh" all
