#!/usr/bin/env bash
# Install Debian's chromium for the report's headless-browser test, if it is missing.
#
#   scripts/install_chromium.sh          # prints the chromium path on success
#
# Needs root (apt-get) and access to Debian's package registry. Exit codes: 0 installed or
# already present; 3 not root and chromium missing; 4 apt-get failed. The tests treat any
# non-zero exit as "skip the browser test, with this reason".
set -euo pipefail

find_chromium() {
    for name in chromium chromium-browser google-chrome chrome; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if path=$(find_chromium); then
    echo "$path"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing and installing it needs root (apt-get install -y chromium)" >&2
    exit 3
fi

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >&2; then
    echo "apt-get could not install chromium (no access to Debian's registry?)" >&2
    exit 4
fi
echo "installed chromium in $(( $(date +%s) - start )) s" >&2
find_chromium || { echo "chromium installed but not on PATH" >&2; exit 4; }
