#!/usr/bin/env bash
# Activate the pixi environment (the script `pixi shell-hook` wrote at build time), then run the given command.
set -eo pipefail
# shellcheck disable=SC1091
source /app/activate.sh
exec "$@"
