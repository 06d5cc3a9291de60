#!/usr/bin/env bash
# What every CI system runs (this project's .ci/run, the GitHub Actions
# workflow in .github/workflows/ci.yml): install the build tools the default
# profile needs through the system package manager (the profile allows it),
# then the test command from README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo xtask doctor --install
cargo xtask ci
