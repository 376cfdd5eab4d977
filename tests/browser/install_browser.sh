#!/usr/bin/env bash
# The browser tests drive Debian's Chromium (never a browser downloaded by Playwright, which
# this network refuses). Install it when it is missing and we may (root with apt-get);
# otherwise say exactly what to do.
set -euo pipefail
browser="${LLMPROXY_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$browser" ]; then
    echo "browser: $browser"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "browser: installing Debian's chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq chromium >/dev/null
    [ -x "$browser" ] && { echo "browser: $browser"; exit 0; }
fi
echo "browser: $browser is missing; install Debian's chromium (sudo apt-get install chromium) or set LLMPROXY_CHROMIUM to a Chromium binary" >&2
exit 1
