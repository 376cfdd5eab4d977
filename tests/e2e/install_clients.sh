#!/usr/bin/env bash
# Installs the three agent CLIs the end-to-end tests drive, at the versions the captures in
# shared/clients/ were made with, into an npm prefix outside the Python environment:
#   $LLMPROXY_E2E_NPM_PREFIX (default: .e2e-npm at the repository root, gitignored).
# Idempotent: npm leaves an already-installed exact version alone. Needs node >= 20 and the
# npm registry; nothing else is downloaded (npm 11 does not run install scripts by default,
# and none of the three needs them for headless use).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PREFIX="${LLMPROXY_E2E_NPM_PREFIX:-$ROOT/.e2e-npm}"
mkdir -p "$PREFIX"
started=$(date +%s)
# --prefer-offline: what the npm cache already holds is not fetched again.
npm install --prefix "$PREFIX" --save-exact --prefer-offline --no-audit --no-fund --loglevel=error \
    @anthropic-ai/claude-code@2.1.197 \
    @openai/codex@0.169.0 \
    @google/gemini-cli@0.61.0
echo "install_clients.sh: clients installed in $PREFIX in $(( $(date +%s) - started )) s"
