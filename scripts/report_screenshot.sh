#!/usr/bin/env bash
# A PNG of a report page, as headless Chromium renders it (the docs' docs/img/report.png).
#
#   scripts/report_screenshot.sh REPORT_HTML OUT_PNG [WIDTH HEIGHT [FRAGMENT]]
#
# docs/img/report.png: `unbackdoor demo --out runs/demo`, then
#   scripts/report_screenshot.sh runs/demo/report/report.html docs/img/report.png 1280 1800
# FRAGMENT sets the drill-down's filters, e.g. "set=triggered&changed=1".
set -euo pipefail
html=${1:?usage: report_screenshot.sh REPORT_HTML OUT_PNG [WIDTH HEIGHT [FRAGMENT]]}
out=${2:?usage: report_screenshot.sh REPORT_HTML OUT_PNG [WIDTH HEIGHT [FRAGMENT]]}
width=${3:-1280}
height=${4:-1800}
fragment=${5:-}
chromium=$(bash "$(dirname "$0")/install_chromium.sh")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
url="file://$(cd "$(dirname "$html")" && pwd)/$(basename "$html")${fragment:+#$fragment}"
"$chromium" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --window-size="$width,$height" --virtual-time-budget=5000 --screenshot="$(realpath -m "$out")" "$url" \
    >/dev/null 2>&1
echo "$out"
