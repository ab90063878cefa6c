#!/usr/bin/env bash
# Everything the test suite needs beyond cargo, installed project-locally:
#   - the pinned CUDA compiler wheels (tools/setup-cuda.sh), so that every kernel is compiled;
#   - the official `openai` Python client into .pydeps/ (tests/serve.rs talks to `flexrun serve`
#     with it, as a user's unchanged client would).
# Idempotent: a second run only checks. Needs python3 with pip and the PyPI registry.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPENAI_PIN="openai==3.60.0"
DEPS="$ROOT/.pydeps"

bash "$ROOT/tools/setup-cuda.sh"

if [ "$(cat "$DEPS/.installed" 2>/dev/null || true)" != "$OPENAI_PIN" ]; then
  echo "setup-test: installing $OPENAI_PIN into .pydeps/" >&2
  rm -rf "$DEPS"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --target "$DEPS" "$OPENAI_PIN"
  echo "$OPENAI_PIN" >"$DEPS/.installed"
fi
PYTHONPATH="$DEPS" python3 -c "import openai" || {
  echo "setup-test: the openai package in .pydeps/ does not import" >&2
  exit 1
}
