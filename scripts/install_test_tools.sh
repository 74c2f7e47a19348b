#!/usr/bin/env bash
# System tools two tests need, from Debian's packages, installed only where that is possible and harmless:
#   chromium        headless browser for tests/e2e/test_demo_screenshot.py (docs/screenshot.png)
#   docker-compose  `docker-compose config` validates docker/docker-compose.yml (tests/test_docker_config.py)
#                   where the `docker compose` plugin is missing
# Runs apt-get only as root on a machine with apt-get; elsewhere it prints what to install and exits 0 (the
# tests that need a missing tool skip and say why). HIH_SKIP_APT=1 skips it. Re-runs are instant.
set -euo pipefail

want=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || want+=(chromium fonts-liberation)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    want+=(docker-compose)
fi

if [[ ${#want[@]} -eq 0 ]]; then
    echo "install_test_tools: chromium and a compose validator are present; nothing to do"
    exit 0
fi
if [[ "${HIH_SKIP_APT:-}" == "1" ]]; then
    echo "install_test_tools: HIH_SKIP_APT=1; not installing ${want[*]} (the tests needing them skip)"
    exit 0
fi
if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_tools: not root or no apt-get: install ${want[*]} yourself to run the tests that use them"
    exit 0
fi

echo "install_test_tools: apt-get install ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
echo "install_test_tools: done"
