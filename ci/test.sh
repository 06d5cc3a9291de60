#!/usr/bin/env bash
# What every CI system runs (this project's .ci/run, the GitHub Actions
# workflow in .github/workflows/ci.yml): install the build tools the default
# profile needs through the system package manager (the profile allows it)
# and the servers the tests start on 127.0.0.1 (an OCI registry, htpasswd),
# then the test command from README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# Incremental state is of no use to a one-off run and took 2.4 GB of disk.
export CARGO_INCREMENTAL=0
cargo xtask doctor --install --test-servers
cargo xtask ci
