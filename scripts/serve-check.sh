#!/usr/bin/env bash
# `paligemma serve` on the bundled demo model, driven by the official `openai` Python
# package and curl, its /metrics read by Prometheus' own parsers (the Python
# prometheus_client, and promtool when installed); the calls of docs/serve.md.
#
#   scripts/serve-check.sh
#
# Makes a venv in target/serve-venv (openai and prometheus_client from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p paligemma-cli
venv=target/serve-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "openai>=1.50" "prometheus_client>=0.20"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
target/release/paligemma serve -m models/demo/paligemma2-demo-f16.gguf --listen "127.0.0.1:$port" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "$base/health" >/dev/null && break; sleep 0.1; done

"$venv/bin/python" scripts/serve_client.py "$base" paligemma2-demo-f16

image=$(base64 -w0 tests/fixtures/demo_eval/frame_0001.png)
echo "curl caption:"
curl -sf "$base/v1/chat/completions" -H 'content-type: application/json' -d @- <<JSON | python3 -c 'import json,sys; r=json.load(sys.stdin); print(" ", r["choices"][0]["message"]["content"])'
{"model": "paligemma2-demo-f16", "max_tokens": 24, "messages": [{"role": "user", "content": [
  {"type": "text", "text": "caption en"},
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,$image"}}]}]}
JSON
echo "curl analyze:"
curl -sf "$base/v1/analyze" -H 'content-type: application/json' \
    -d "{\"prompt\": \"detect circle\", \"image\": \"$image\"}" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(" ", r["schema"], r["result"])'
echo "curl error:"
curl -s "$base/v1/chat/completions" -H 'content-type: application/json' -d '{"model": "paligemma2-demo-f16", "messages": []}' -w ' (HTTP %{http_code})\n'
if command -v promtool >/dev/null; then
    curl -sf "$base/metrics" | promtool check metrics && echo "promtool: the metrics pass"
else
    echo "promtool not installed (Debian: apt-get install prometheus); the Python parser read them"
fi
