#!/usr/bin/env bash
# Install what the tests need (scripts/setup.sh) and run the whole suite, integration tests included.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not integration".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
exec pytest -p no:cacheprovider "$@"
