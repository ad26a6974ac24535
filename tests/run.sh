#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --workspace --locked "$@"
