"""Drives `paligemma serve` with the official `openai` Python package and checks its
/metrics with Prometheus' own Python parser (run by scripts/serve-check.sh, which
starts the server; docs/serve.md shows the same calls).

    python3 scripts/serve_client.py http://127.0.0.1:8080 models/demo/paligemma2-demo-f16
"""
import base64
import json
import sys
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def ask(task, image, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": task},
            {"type": "image_url", "image_url": {"url": image}},
        ]}],
        max_tokens=24,
        **kw,
    )


frame = data_url("tests/fixtures/demo_eval/frame_0000.png")
ids = [m.id for m in client.models.list().data]
assert model in ids, ids
print("models:", ids)

caption = ask("caption en", frame)
print("caption:", caption.choices[0].message.content)
assert caption.choices[0].message.content

detection = ask("detect ball ; circle ; square ; triangle", frame)
typed = detection.model_extra["paligemma"]["result"]
print("detection:", detection.choices[0].message.content)
for d in typed["detections"]:
    print(f"  {d['label']} {d['box']['x1']:.0f},{d['box']['y1']:.0f} {d['box']['x2']:.0f},{d['box']['y2']:.0f} score {d['score']:.2f}")
assert typed["kind"] == "detections" and typed["detections"]

pieces = []
for chunk in ask("detect ball ; circle ; square ; triangle", frame, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
print("streamed:", pieces)
assert "".join(pieces) == detection.choices[0].message.content

errors = 0
for name, call, kind in [
    ("no image", lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "caption en"}]), openai.BadRequestError),
    ("broken base64", lambda: ask("caption en", "data:image/png;base64,iVBOR!!"), openai.BadRequestError),
    ("unknown model", lambda: client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), openai.NotFoundError),
]:
    try:
        call()
        raise SystemExit(f"{name}: no error")
    except kind as e:
        errors += 1
        print(f"{name}: {e.status_code} {e.body['message']}")

with urllib.request.urlopen(f"{base}/metrics") as r:
    text = r.read().decode()
samples = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        samples[(s.name, tuple(sorted(s.labels.items())))] = s.value


def requests(task, status):
    key = ("paligemma_requests_total", (("endpoint", "chat"), ("status", status), ("task", task)))
    return samples.get(key, 0)


print("metrics:", len(samples), "samples parsed")
assert requests("caption", "200") == 1, requests("caption", "200")
assert requests("detect", "200") == 2
assert requests("caption", "400") == 1  # the broken image
assert requests("", "400") == 1 and requests("", "404") == 1
print("serve-check: the openai client and the Prometheus parser agree with the server")
