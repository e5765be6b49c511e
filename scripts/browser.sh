#!/usr/bin/env bash
# Makes sure headless Chromium and its driver are here for the web console's tests, installing
# Debian's chromium and chromium-driver where they are missing and this user can (root with
# apt). Exit 0: both run. Exit 1 with one line on stderr: they cannot be installed here (the
# console's browser tests skip, saying so in one line).
set -uo pipefail

cannot() { echo "browser: $*" >&2; exit 1; }
works() { chromium --version >/dev/null 2>&1 && chromedriver --version >/dev/null 2>&1; }

works && exit 0
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || cannot "no chromium, and installing it needs root and apt-get"
echo "browser: installing chromium and chromium-driver (apt-get)"
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
  >/tmp/vaeserve-apt-chromium.log 2>&1 || cannot "apt-get install chromium failed (/tmp/vaeserve-apt-chromium.log)"
works || cannot "chromium was installed but does not start (chromium --version)"
