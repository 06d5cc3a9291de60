#!/usr/bin/env bash
# What every CI system runs (this project's .ci/run, the GitHub Actions
# workflow in .github/workflows/ci.yml): install the build tools the default
# profile needs through the system package manager (the profile allows it)
# and the servers the tests start on 127.0.0.1 (an OCI registry, htpasswd),
# then the test command from README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo xtask doctor --install --test-servers
cargo xtask ci
