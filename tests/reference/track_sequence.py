"""Moving sequences for tracking evaluation: the demo model's shapes moving across a frame,
crossing and hiding each other, with the identity of every object in every frame.

    python tests/reference/track_sequence.py OUT_DIR [--seed 2001] [--frames 300] [--objects 2 3 4 5]

Writes one sequence per `--objects` count, each `--frames` frames of 320x240 at 30 fps, as
`OUT_DIR/s<K>_f<NNNN>.png` and `OUT_DIR/truth.jsonl`, one line per frame:
`{"sequence", "frame", "image", "width", "height", "objects": [{"id", "label", "colour",
"box": [x1, y1, x2, y2], "visible"}]}` (boxes in pixels, the whole shape even where another hides
it; `visible` is the share of the shape's pixels not covered by shapes drawn after it).

Each sequence has its own solid background and objects of the demo's shapes and colours (as
`train_demo.py` renders them: anti-aliased, the same sizes), each moving at a constant velocity
of 1 to 4 pixels a frame and bouncing off the frame's edges. They are drawn in a fixed order,
so where two cross the later one hides the earlier. Frame i of sequence K comes from
`default_rng([seed, K])` only, so the files are the same on every run.

`paligemma eval --tracking --set OUT_DIR` reads them (see tests/reference/README.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from train_demo import COLOURS, SHAPES, shape_alpha

W, H = 320, 240


def background(rng: np.random.Generator) -> np.ndarray:
    """A solid colour far from every shape colour the objects may take (so all stay visible)."""
    while True:
        c = rng.integers(60, 200, 3).astype(np.float32)
        if all(np.abs(c - np.array(v, np.float32)).sum() >= 150 for v in COLOURS.values()):
            return np.broadcast_to(c, (H, W, 3)).copy()


def sequence(rng: np.random.Generator, n_objects: int, n_frames: int):
    bg = background(rng)
    objects = []
    for i in range(n_objects):
        kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
        size = float(rng.uniform(0.15, 0.3) * min(W, H))
        width = size * (float(rng.uniform(0.85, 1.15)) if kind == "triangle" else 1.0)
        speed = float(rng.uniform(1.0, 4.0))
        angle = float(rng.uniform(0, 2 * np.pi))
        objects.append({
            "id": i + 1, "label": kind, "colour": colour, "w": width, "h": size,
            "x": float(rng.uniform(0, W - width)), "y": float(rng.uniform(0, H - size)),
            "vx": speed * np.cos(angle), "vy": speed * np.sin(angle),
        })
    for _ in range(n_frames):
        img = bg.copy()
        covered = []
        for o in objects:
            box = (o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"])
            x0, y0, a = shape_alpha(o["label"], box, W, H)
            region = img[y0:y0 + a.shape[0], x0:x0 + a.shape[1]]
            col = np.array(COLOURS[o["colour"]], np.float32)
            region[...] = region * (1 - a[..., None]) + col[None, None] * a[..., None]
            mask = np.zeros((H, W), np.float32)
            mask[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a
            covered.append((o, box, mask))
        truth = []
        for k, (o, box, mask) in enumerate(covered):
            hidden = np.zeros((H, W), np.float32)
            for _, _, later in covered[k + 1:]:
                hidden = np.maximum(hidden, later)
            visible = float((mask * (1 - hidden)).sum() / max(mask.sum(), 1e-6))
            truth.append({"id": o["id"], "label": o["label"], "colour": o["colour"],
                          "box": [round(v, 2) for v in box], "visible": round(visible, 3)})
        yield np.clip(np.rint(img), 0, 255).astype(np.uint8), truth
        for o in objects:
            for pos, vel, size, limit in (("x", "vx", "w", W), ("y", "vy", "h", H)):
                o[pos] += o[vel]
                if o[pos] < 0 or o[pos] + o[size] > limit:
                    o[vel] = -o[vel]
                    o[pos] = min(max(o[pos], 0.0), limit - o[size])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=2001)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--objects", type=int, nargs="+", default=[2, 3, 4, 5])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for n in args.objects:
        rng = np.random.default_rng([args.seed, n])
        for f, (img, objects) in enumerate(sequence(rng, n, args.frames)):
            name = f"s{n}_f{f:04d}.png"
            Image.fromarray(img).save(args.out / name, optimize=True)
            lines.append(json.dumps({"sequence": n, "frame": f, "image": name, "width": W, "height": H,
                                     "objects": objects}))
    (args.out / "truth.jsonl").write_text("\n".join(lines) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {len(lines)} frames + truth.jsonl to {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
