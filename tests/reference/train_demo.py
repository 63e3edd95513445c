#!/usr/bin/env python3
"""Train the small PaliGemma 2 demo model on synthetic frames (see tests/reference/README.md, "Demo model").

A real PaliGemma 2 architecture (SigLIP vision tower, linear projector, Gemma 2 text model with attention
and final logit softcaps, alternating sliding / full attention layers, GQA, tied LM head), only small,
trained from scratch on frames this script renders itself (seeded), so it answers

    detect circle            ->  <loc0123><loc0456><loc0789><loc0999> circle ; <loc...>... circle
    detect circle ; square   ->  all circles (left to right), then all squares
    detect ball              ->  the ball of a `videotestsrc pattern=ball`-like frame
    caption en               ->  a red circle, a blue square and a green triangle   (left to right)
    answer en how many circles?  ->  2

The tokenizer has the structure of the fixtures' (make_fixtures.py's builder, BPE trained on this task's
vocabulary). Images go through the same Pillow bicubic resize as PaliGemmaProcessor (checked at start).

Usage (from the repository root, in the environment of tests/reference/requirements.txt, no torchvision):

    python tests/reference/train_demo.py pretrain-vision             # stage 0: the vision tower -> /tmp/demo_vision.pt
    python tests/reference/train_demo.py train --vision-from /tmp/demo_vision.pt   # -> /tmp/demo_hf (+ log, checkpoints)
    # further stages start from a checkpoint's weights (a fresh optimizer and schedule, their own seed):
    python tests/reference/train_demo.py train --work W2 --out O2 --init-from /tmp/demo_train/ckpt.pt --seed 1 ...
    python tests/reference/train_demo.py eval --model /tmp/demo_hf --n 100
    python tests/reference/train_demo.py export-ckpt --work /tmp/demo_train --out /tmp/demo_hf_snapshot
    python tests/reference/train_demo.py --export-eval DIR N SEED [MAX_BYTES]  # held-out PNGs + truth.jsonl

Everything is a function of --seed: the weights' init, and the training data (batch `step` is rendered
from a generator seeded with (seed, step)), so a run killed and resumed from its checkpoint continues with
exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# ---------------------------------------------------------------------------------------------
# 1. the synthetic world
# ---------------------------------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 35, 35),
    "green": (35, 175, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
}
BALL_COLOURS = {"white": (255, 255, 255), "grey": (140, 140, 140)}
# frame sizes (width, height); the model sees every frame squashed to a square
FRAME_SIZES = [(320, 240)] * 4 + [(640, 480), (640, 360), (480, 360), (352, 288), (400, 300), (256, 256),
                                  (240, 320), (480, 270), (300, 300), (160, 120), (1280, 720), (720, 576)]
LOC_DIV = 1023  # bin = round(v * 1023), v = bin / 1023 (design.md section 3)
MAX_OBJECTS = 3


def plural(shape: str) -> str:
    return shape + "s"


def _coverage_1d(lo: float, hi: float, n: int) -> np.ndarray:
    """Fraction of each pixel [i, i+1) covered by [lo, hi)."""
    i = np.arange(n, dtype=np.float32)
    return np.clip(np.minimum(i + 1, hi) - np.maximum(i, lo), 0.0, 1.0)


def shape_alpha(kind: str, box: tuple[float, float, float, float], W: int, H: int):
    """Anti-aliased coverage of a shape whose tight box is `box` (continuous pixel coordinates, pixel i
    covers [i, i+1)). Returns (x0, y0, alpha[h, w]) for the pixel window that contains the shape."""
    x1, y1, x2, y2 = box
    x0, y0 = max(int(math.floor(x1)), 0), max(int(math.floor(y1)), 0)
    xe, ye = min(int(math.ceil(x2)), W), min(int(math.ceil(y2)), H)
    w, h = xe - x0, ye - y0
    if kind == "square":
        a = np.outer(_coverage_1d(y1 - y0, y2 - y0, h), _coverage_1d(x1 - x0, x2 - x0, w))
        return x0, y0, a
    # supersampled (4 x 4) for circles and triangles
    ss = 4
    ys = (np.arange(h * ss, dtype=np.float32) + 0.5) / ss + y0
    xs = (np.arange(w * ss, dtype=np.float32) + 0.5) / ss + x0
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if kind in ("circle", "ball"):
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif kind == "triangle":  # apex at the top centre, base at the bottom
        cx = (x1 + x2) / 2
        t = (yy - y1) / max(y2 - y1, 1e-6)  # 0 at the apex, 1 at the base
        half = t * (x2 - x1) / 2
        inside = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= half)
    else:
        raise ValueError(kind)
    a = inside.reshape(h, ss, w, ss).mean(axis=(1, 3)).astype(np.float32)
    return x0, y0, a


def _background(rng: np.random.Generator, W: int, H: int) -> np.ndarray:
    """Solid colour, linear gradient or noise; never dark (dark frames belong to the ball)."""

    def colour():
        while True:
            c = rng.integers(0, 256, 3)
            if c.mean() >= 70:
                return c.astype(np.float32)

    kind = rng.choice(["solid", "gradient", "noise"], p=[0.35, 0.4, 0.25])
    if kind == "solid":
        img = np.broadcast_to(colour(), (H, W, 3)).copy()
    elif kind == "gradient":
        a, b = colour(), colour()
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        t = (xx / W - 0.5) * math.cos(ang) + (yy / H - 0.5) * math.sin(ang)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    else:
        base = colour()
        sigma = rng.uniform(15, 45)
        # blocky noise: a low-resolution noise field upscaled, plus fine noise
        cell = int(rng.integers(1, 9))
        small = rng.normal(0, sigma, (H // cell + 1, W // cell + 1, 3)).astype(np.float32)
        img = base[None, None] + np.repeat(np.repeat(small, cell, 0), cell, 1)[:H, :W]
    return img


def _fits(box, boxes, margin):
    x1, y1, x2, y2 = box
    for b in boxes:
        if x1 < b[2] + margin and b[0] < x2 + margin and y1 < b[3] + margin and b[1] < y2 + margin:
            return False
    return True


def render_shapes(rng: np.random.Generator, W: int, H: int, n_objects: int | None = None):
    img = _background(rng, W, H)
    m = min(W, H)
    n = n_objects if n_objects is not None else int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    objects = []
    for _ in range(n):
        for _attempt in range(50):
            kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
            cname = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
            s = rng.uniform(0.13, 0.42) * m
            sw = s * (rng.uniform(0.85, 1.15) if kind == "triangle" else 1.0)
            x1 = rng.uniform(0, W - sw)
            y1 = rng.uniform(0, H - s)
            box = (float(x1), float(y1), float(x1 + sw), float(y1 + s))
            if not _fits(box, [o["box"] for o in objects], 0.03 * m):
                continue
            x0, y0, a = shape_alpha(kind, box, W, H)
            region = img[y0:y0 + a.shape[0], x0:x0 + a.shape[1]]
            col = np.array(COLOURS[cname], np.float32) + rng.uniform(-18, 18, 3).astype(np.float32)
            col = np.clip(col, 0, 255)
            # enough contrast with the background under the shape
            bg_mean = region.reshape(-1, 3).mean(0)
            if np.abs(bg_mean - col).sum() < 150:
                continue
            region[...] = region * (1 - a[..., None]) + col[None, None] * a[..., None]
            objects.append({"label": kind, "colour": cname, "box": box, "alpha": (x0, y0, a)})
            break
    if rng.random() < 0.4:
        img = img + rng.normal(0, rng.uniform(2, 14), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def render_ball(rng: np.random.Generator, W: int, H: int):
    """Like `videotestsrc pattern=ball`: an anti-aliased filled disc on black."""
    img = np.zeros((H, W, 3), np.float32)
    if rng.random() < 0.2:
        img += rng.uniform(0, 25)  # a not-quite-black background
    cname = "white" if rng.random() < 0.75 else "grey"
    col = np.array(BALL_COLOURS[cname], np.float32) - (rng.uniform(0, 30) if cname == "white" else rng.uniform(-25, 25))
    d = rng.uniform(0.1, 0.3) * min(W, H)
    x1, y1 = rng.uniform(0, W - d), rng.uniform(0, H - d)
    box = (float(x1), float(y1), float(x1 + d), float(y1 + d))
    x0, y0, a = shape_alpha("ball", box, W, H)
    region = img[y0:y0 + a.shape[0], x0:x0 + a.shape[1]]
    region[...] = region * (1 - a[..., None]) + col[None, None] * a[..., None]
    if rng.random() < 0.3:
        img = img + rng.normal(0, rng.uniform(1, 6), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), [{"label": "ball", "colour": cname, "box": box,
                                                             "alpha": (x0, y0, a)}]


def render_scene(rng: np.random.Generator, ball_prob: float = 0.3):
    W, H = FRAME_SIZES[int(rng.integers(0, len(FRAME_SIZES)))]
    if rng.random() < 0.15:  # any other size / aspect ratio
        W, H = int(rng.integers(120, 700)), int(rng.integers(120, 560))
    if rng.random() < ball_prob:
        arr, objects = render_ball(rng, W, H)
        kind = "ball"
    else:
        arr, objects = render_shapes(rng, W, H)
        kind = "shapes"
    return {"kind": kind, "width": W, "height": H, "image": arr, "objects": objects}


def to_bins(box, W, H):
    x1, y1, x2, y2 = box
    f = lambda v: int(min(max(round(v * LOC_DIV), 0), LOC_DIV))  # noqa: E731
    return f(y1 / H), f(x1 / W), f(y2 / H), f(x2 / W)


def detect_target(scene, classes: list[str]) -> tuple[str, list[dict]]:
    objs = []
    for c in classes:
        objs += sorted([o for o in scene["objects"] if o["label"] == c], key=lambda o: (o["box"][0], o["box"][1]))
    parts = []
    for o in objs:
        b = to_bins(o["box"], scene["width"], scene["height"])
        parts.append("".join(f"<loc{v:04d}>" for v in b) + " " + o["label"])
    return " ; ".join(parts), objs


def caption_of(scene) -> str:
    objs = sorted(scene["objects"], key=lambda o: (o["box"][0] + o["box"][2]) / 2)
    words = [f"a {o['colour']} {o['label']}" for o in objs]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def count_prompt(shape: str, plural_form: bool) -> str:
    return f"answer en how many {plural(shape) if plural_form else shape}?"


def sample_task(rng: np.random.Generator, scene, mix: tuple[float, float] = (0.5, 0.75)) -> tuple[str, str]:
    """A (prompt, target) pair for a scene. For shape scenes, `mix` = (p_detect, p_detect + p_caption); the
    rest are counting questions."""
    present = sorted({o["label"] for o in scene["objects"]})
    r = rng.random()
    if scene["kind"] == "ball":
        if r < 0.6:
            return "detect ball", detect_target(scene, ["ball"])[0]
        if r < 0.8:
            return "caption en", caption_of(scene)
        if rng.random() < 0.85:
            return count_prompt("ball", rng.random() < 0.7), "1"
        shape = SHAPES[int(rng.integers(0, 3))]
        return count_prompt(shape, rng.random() < 0.7), "0"
    if r < mix[0]:
        if rng.random() < 0.05:
            classes = ["ball"]
        else:
            k = 1 if rng.random() < 0.65 else 2
            if rng.random() < 0.8:
                first = present[int(rng.integers(0, len(present)))]
            else:
                first = SHAPES[int(rng.integers(0, 3))]
            classes = [first]
            if k == 2:
                rest = [s for s in SHAPES if s != first]
                classes.append(rest[int(rng.integers(0, 2))])
        return "detect " + " ; ".join(classes), detect_target(scene, classes)[0]
    if r < mix[1]:
        return "caption en", caption_of(scene)
    shape = present[int(rng.integers(0, len(present)))] if rng.random() < 0.75 else SHAPES[int(rng.integers(0, 3))]
    n = sum(o["label"] == shape for o in scene["objects"])
    return count_prompt(shape, rng.random() < 0.7), str(n)


# ---------------------------------------------------------------------------------------------
# 2. tokenizer (make_fixtures.py's builder, BPE trained on the demo vocabulary)
# ---------------------------------------------------------------------------------------------


def demo_corpus() -> str:
    lines = ["caption en", "detect ball", "answer en how many balls?", "answer en how many ball?", "a white ball",
             "a grey ball"]
    for s in SHAPES:
        lines.append(f"detect {s}")
        lines.append(f"answer en how many {plural(s)}?")
        lines.append(f"answer en how many {s}?")
        for t in SHAPES:
            if t != s:
                lines.append(f"detect {s} ; {t}")
        lines.append(f"x {s} ; x {s}")  # the label after the loc tokens: '▁circle', '▁;'
        for c in COLOURS:
            lines.append(f"a {c} {s}, a {c} {s} and a {c} {s}")
    lines.append("x ball")
    lines += [str(i) for i in range(10)]
    return "\n".join(lines) + "\n"


def build_demo_tokenizer():
    import make_fixtures as mf

    mf.CORPUS = demo_corpus()
    mf.N_MERGES = 2000  # until every corpus word is one piece (the trainer stops when no pair is left)
    return mf.build_tokenizer_json()


def write_hf_files(hf_dir: Path, tok_json: dict, tok_ids: dict, image_size: int, n_img: int):
    import make_fixtures as mf

    mf.write_hf_tokenizer_files(hf_dir, tok_json, tok_ids)
    mf.dump_json(hf_dir / "preprocessor_config.json", mf.preprocessor_config_json(image_size, n_img))


# ---------------------------------------------------------------------------------------------
# 3. model
# ---------------------------------------------------------------------------------------------

SPEC = {
    "family": "paligemma2",
    "vision": dict(image_size=128, patch_size=16, hidden_size=96, num_hidden_layers=4, num_attention_heads=3,
                   intermediate_size=384),
    "text": dict(model_type="gemma2", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, intermediate_size=512, query_pre_attn_scalar=64,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=128),
}


def sincos_2d(n_side: int, dim: int) -> np.ndarray:
    """Patch position features: sin / cos of pi * k * v for the patch centre v = (i + 0.5) / n in y and x, with
    q = dim / 4 frequencies k from 0.5 to n (the same kind of features as the loc embeddings below)."""
    q = dim // 4
    k = np.linspace(0.5, n_side, q)
    v = (np.arange(n_side, dtype=np.float64) + 0.5) / n_side
    y, x = np.meshgrid(v, v, indexing="ij")
    out = []
    for c in (y.reshape(-1), x.reshape(-1)):
        a = np.pi * c[:, None] * k[None]
        out += [np.sin(a), np.cos(a)]
    return np.concatenate(out, 1)  # [n*n, dim]


def loc_features(n_freq: int = 32) -> np.ndarray:
    """[1024, 2 * n_freq]: sin / cos of pi * k * (bin / 1023), k = 1..n_freq, weighted 1 / k: the inner product
    of two rows is a smooth kernel of the bins' distance, peaked at 0 (neighbouring bins are similar)."""
    v = (np.arange(1024) / 1023.0)[:, None]
    k = np.arange(1, n_freq + 1, dtype=np.float64)[None]
    return np.concatenate([np.sin(np.pi * k * v) / k, np.cos(np.pi * k * v) / k], 1)


def build_model(tok_ids: dict, seed: int):
    import torch
    from transformers import GenerationConfig

    import make_fixtures as mf

    cfg = mf.make_config(SPEC, tok_ids)
    torch.manual_seed(seed)
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration(cfg)
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # structured inits (the weights stay free): smooth loc-token embeddings (neighbouring bins similar,
        # which the tied LM head inherits) and 2-D sin/cos vision position embeddings
        emb = model.get_input_embeddings().weight
        d = emb.shape[1]
        feats = torch.from_numpy(loc_features())  # [1024, 64]
        proj = torch.linalg.qr(torch.randn(d, feats.shape[1], generator=g, dtype=torch.float64))[0].T  # orthonormal rows
        loc = feats @ proj
        loc = loc / loc.norm(dim=1).mean() * emb.norm(dim=1).mean().item()
        emb[tok_ids["first_loc"]:tok_ids["first_loc"] + 1024] = loc.float()
        pe = model.model.vision_tower.embeddings.position_embedding.weight
        n_side = SPEC["vision"]["image_size"] // SPEC["vision"]["patch_size"]
        pe.copy_(torch.from_numpy(sincos_2d(n_side, pe.shape[1])).float() * 0.5)
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=tok_ids["bos"], eos_token_id=tok_ids["eos"],
                                               pad_token_id=tok_ids["pad"], do_sample=False, max_new_tokens=48)
    return model


# ---------------------------------------------------------------------------------------------
# 4. encoding (the processor's layout; checked against PaliGemmaProcessor at start)
# ---------------------------------------------------------------------------------------------


def squash(arr: np.ndarray, size: int) -> np.ndarray:
    """The processor's resize: Pillow bicubic of the uint8 frame to size x size."""
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))


def normalise(u8: np.ndarray) -> np.ndarray:
    """The processor's pixel values, f32 in [-1, 1], channels last."""
    return ((u8.astype(np.float32) / 255.0) - 0.5) / 0.5


class Encoder:
    def __init__(self, hf_dir: Path):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(hf_dir)
        assert type(self.processor.image_processor).__name__ == "SiglipImageProcessorPil"
        self.tok = self.processor.tokenizer
        self.size = self.processor.image_processor.size["height"]
        self.n_img = self.processor.image_seq_length
        self.image_id = self.processor.image_token_id
        self.bos = self.tok.bos_token_id
        self.eos = self.tok.eos_token_id
        self._cache: dict[str, list[int]] = {}

    def text_ids(self, s: str) -> list[int]:
        if s not in self._cache:
            self._cache[s] = self.tok(s, add_special_tokens=False)["input_ids"]
        return self._cache[s]

    def pixels(self, arr: np.ndarray) -> np.ndarray:
        return normalise(squash(arr, self.size))

    def prefix_ids(self, prompt: str) -> list[int]:
        return [self.image_id] * self.n_img + [self.bos] + self.text_ids(prompt + "\n")

    def suffix_ids(self, target: str) -> list[int]:
        return (self.text_ids(target) if target else []) + [self.eos]

    def check_against_processor(self, rng: np.random.Generator):
        for _ in range(6):
            sc = render_scene(rng)
            prompt, target = sample_task(rng, sc)
            im = Image.fromarray(sc["image"])
            r = self.processor(images=im, text=prompt, suffix=target, return_tensors="np")
            ids = self.prefix_ids(prompt) + self.suffix_ids(target)
            assert r["input_ids"][0].tolist() == ids, (prompt, target, r["input_ids"][0].tolist(), ids)
            assert r["token_type_ids"][0].tolist() == [0] * len(self.prefix_ids(prompt)) + [1] * len(
                self.suffix_ids(target))
            assert np.array_equal(r["pixel_values"][0], self.pixels(sc["image"]).transpose(2, 0, 1))
            r2 = self.processor(images=im, text=prompt, return_tensors="np")
            assert r2["input_ids"][0].tolist() == self.prefix_ids(prompt)


AUX_CLASSES = ["circle", "square", "triangle", "ball"]  # patch classes 1..4 (0: no object centre here)
AUX_COLOURS = ["red", "green", "blue", "yellow", "white", "grey"]
# the auxiliary head's outputs: class logits (0 = none), colour logits, box, coverage logits
AUX_CLS = slice(0, 1 + len(AUX_CLASSES))
AUX_COL = slice(AUX_CLS.stop, AUX_CLS.stop + len(AUX_COLOURS))
AUX_BOX = slice(AUX_COL.stop, AUX_COL.stop + 4)
AUX_COV = slice(AUX_BOX.stop, AUX_BOX.stop + len(AUX_CLASSES))


def aux_targets(scene, n_side: int) -> dict[str, np.ndarray]:
    """Dense per-patch targets for the training-only auxiliary head on the vision tower's output (the exported
    model has no trace of it). On the n x n patch grid of the squashed frame: `cls`, the class of the object whose
    box centre lies in the patch (0 for none); `col`, its colour (-100 for none); `box`, its box as (y1, x1, y2,
    x2) / size, the order of the loc tokens; `cov`, the fraction of the patch's pixels that each class covers
    (from the rendered coverage, so a patch on a circle's rim and one on a square's corner get different
    targets: the local evidence of the shape). Supervising every patch directly teaches the tower what and
    where the shapes are far sooner than the caption and loc tokens alone do, which reach it only through the
    decoder."""
    n2 = n_side * n_side
    cls = np.zeros(n2, np.int64)
    col = np.full(n2, -100, np.int64)
    box = np.zeros((n2, 4), np.float32)
    cov = np.zeros((n2, len(AUX_CLASSES)), np.float32)
    W, H = scene["width"], scene["height"]
    # the patch of each original pixel (pixel i covers [i, i + 1); its centre decides)
    cell_x = np.minimum(((np.arange(W) + 0.5) * n_side / W).astype(np.int64), n_side - 1)
    cell_y = np.minimum(((np.arange(H) + 0.5) * n_side / H).astype(np.int64), n_side - 1)
    cell_area = np.outer(np.bincount(cell_y, minlength=n_side), np.bincount(cell_x, minlength=n_side)).reshape(-1)
    for o in scene["objects"]:
        x1, y1, x2, y2 = o["box"][0] / W, o["box"][1] / H, o["box"][2] / W, o["box"][3] / H
        r = min(int((y1 + y2) / 2 * n_side), n_side - 1)
        c = min(int((x1 + x2) / 2 * n_side), n_side - 1)
        k = AUX_CLASSES.index(o["label"])
        cls[r * n_side + c] = k + 1
        col[r * n_side + c] = AUX_COLOURS.index(o["colour"])
        box[r * n_side + c] = (y1, x1, y2, x2)
        x0, y0, a = o["alpha"]
        idx = (cell_y[y0:y0 + a.shape[0], None] * n_side + cell_x[None, x0:x0 + a.shape[1]]).reshape(-1)
        cov[:, k] += np.bincount(idx, weights=a.reshape(-1), minlength=n2) / cell_area
    return {"cls": cls, "col": col, "box": box, "cov": cov}


def make_batch(enc: Encoder, rng: np.random.Generator, batch: int, mix: tuple[float, float]):
    import torch

    seqs, n_prefix, pix, aux = [], [], [], []
    n_side = SPEC["vision"]["image_size"] // SPEC["vision"]["patch_size"]
    for _ in range(batch):
        sc = render_scene(rng)
        prompt, target = sample_task(rng, sc, mix)
        p, s = enc.prefix_ids(prompt), enc.suffix_ids(target)
        seqs.append(p + s)
        n_prefix.append(len(p))
        pix.append(enc.pixels(sc["image"]).transpose(2, 0, 1))
        aux.append(aux_targets(sc, n_side))
    L = max(map(len, seqs))
    ids = torch.full((batch, L), enc.tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((batch, L), dtype=torch.long)
    tt = torch.ones((batch, L), dtype=torch.long)
    labels = torch.full((batch, L), -100, dtype=torch.long)
    for i, (s, npf) in enumerate(zip(seqs, n_prefix)):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        tt[i, :npf] = 0
        labels[i, npf - 1:len(s) - 1] = torch.tensor(s[npf:])  # position t predicts token t + 1
    aux = {k: torch.from_numpy(np.stack([a[k] for a in aux])) for k in aux[0]}
    return ids, att, tt, torch.from_numpy(np.stack(pix)), labels, aux


class StepBatches:
    """Batch `step` of a run: a pure function of (seed, step)."""

    def __init__(self, enc, seed, batch, start, steps, mix):
        self.enc, self.seed, self.batch, self.start, self.steps, self.mix = enc, seed, batch, start, steps, mix

    def __len__(self):
        return self.steps - self.start

    def __getitem__(self, i):
        return make_batch(self.enc, np.random.default_rng([self.seed, self.start + i]), self.batch, self.mix)


class AuxHead:
    """A linear map from each vision token (the projector's input) to the `aux_targets` of its patch, fed by a
    hook on the projector. Training only: it is saved in the checkpoint, never in the exported model."""

    def __init__(self, model, seed: int):
        import torch

        torch.manual_seed(seed + 2)
        self.linear = torch.nn.Linear(SPEC["vision"]["hidden_size"], AUX_COV.stop)
        self.features = None
        model.model.multi_modal_projector.register_forward_pre_hook(self._keep)

    def _keep(self, _module, args):
        self.features = args[0]

    def loss(self, t: dict):
        import torch
        import torch.nn.functional as F

        o = self.linear(self.features)  # [B, N, AUX_COV.stop]
        # most patches hold no object centre: weigh them down, or "nothing here" is all the head learns
        weight = torch.tensor([0.1] + [1.0] * len(AUX_CLASSES))
        cls = F.cross_entropy(o[..., AUX_CLS].flatten(0, 1), t["cls"].flatten(), weight=weight)
        pos = t["cls"] > 0
        col = F.cross_entropy(o[..., AUX_COL][pos], t["col"][pos])
        box = (o[..., AUX_BOX][pos].sigmoid() - t["box"][pos]).abs().sum(-1).mean()
        cov = F.binary_cross_entropy_with_logits(o[..., AUX_COV], t["cov"])
        acc = (self._class_at(o, pos) == t["cls"][pos] - 1).float().mean()
        return cls + col + 5 * box + cov, {"aux_cls_acc": acc.item(), "aux_box_l1": box.item() / 4}

    @staticmethod
    def _class_at(o, pos):
        """The head's object class (index into AUX_CLASSES) at the patches `pos`, "none" left out."""
        return o[..., AUX_CLS][..., 1:][pos].argmax(-1)

    def confusion(self, t: dict):
        """Rows: the true class of each object centre patch; columns: the head's class there."""
        pos = t["cls"] > 0
        pred = self._class_at(self.linear(self.features), pos)
        m = np.zeros((len(AUX_CLASSES), len(AUX_CLASSES)), np.int64)
        np.add.at(m, (t["cls"][pos].numpy() - 1, pred.numpy()), 1)
        return m


def loss_fn(model, batch, tok_ids, loc_sigma: float, loc_smooth: float, aux: AuxHead, aux_weight: float):
    import torch
    import torch.nn.functional as F

    ids, att, tt, pix, labels, aux_t = batch
    out = model.model(input_ids=ids, attention_mask=att, token_type_ids=tt, pixel_values=pix, use_cache=False)
    h = out.last_hidden_state
    sel = labels != -100
    hs = h[sel]
    tgt = labels[sel]
    logits = model.lm_head(hs).float()
    cap = model.config.text_config.final_logit_softcapping
    logits = torch.tanh(logits / cap) * cap
    logp = F.log_softmax(logits, -1)
    nll = -logp.gather(1, tgt[:, None])[:, 0]
    first = tok_ids["first_loc"]
    is_loc = (tgt >= first) & (tgt < first + 1024)
    loss_tok = nll.clone()
    if is_loc.any() and loc_smooth > 0:
        b = (tgt[is_loc] - first).float()
        grid = torch.arange(1024, dtype=torch.float32)
        w = torch.exp(-0.5 * ((grid[None] - b[:, None]) / loc_sigma) ** 2)
        w = w / w.sum(1, keepdim=True)
        soft = -(w * logp[is_loc][:, first:first + 1024]).sum(1)
        loss_tok[is_loc] = (1 - loc_smooth) * nll[is_loc] + loc_smooth * soft
    acc = (logits.argmax(-1) == tgt).float()
    metrics = {"nll": nll.mean().item(), "tok_acc": acc.mean().item(),
               "loc_acc": acc[is_loc].mean().item() if is_loc.any() else float("nan"),
               "txt_acc": acc[~is_loc].mean().item() if (~is_loc).any() else float("nan"),
               "aux_cls_acc": float("nan"), "aux_box_l1": float("nan")}
    loss = loss_tok.mean()
    if aux_weight > 0:
        aux_loss, m = aux.loss(aux_t)
        metrics.update(m)
        loss = loss + aux_weight * aux_loss
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# 5. evaluation (greedy, transformers generate, one frame at a time like the engine)
# ---------------------------------------------------------------------------------------------

DET_RE = re.compile(r"((?:<loc\d{4}>){4})\s*([^;<]*)")


def parse_detections(text: str, W: int, H: int) -> list[dict]:
    out = []
    for m in DET_RE.finditer(text):
        b = [int(x) / LOC_DIV for x in re.findall(r"\d{4}", m.group(1))]
        out.append({"label": m.group(2).strip(), "box": (b[1] * W, b[0] * H, b[3] * W, b[2] * H)})
    return out


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


def match(pred: list[dict], truth: list[dict], thr=0.5) -> tuple[int, int]:
    """Greedy one-to-one matching by IoU among same-label boxes; returns (true positives, false positives)."""
    used = set()
    tp = 0
    for t in truth:
        best, bj = thr, None
        for j, p in enumerate(pred):
            if j in used or p["label"] != t["label"]:
                continue
            v = iou(p["box"], t["box"])
            if v >= best:
                best, bj = v, j
        if bj is not None:
            used.add(bj)
            tp += 1
    return tp, len(pred) - len(used)


def caption_objects(text: str):
    return sorted(re.findall(r"\ba (\w+) (\w+)", text))


def eval_item(rng: np.random.Generator):
    """One held-out frame with its three prompts and their ground truth."""
    sc = render_scene(rng)
    W, H = sc["width"], sc["height"]
    if sc["kind"] == "ball":
        classes = ["ball"]
    else:
        present = sorted({o["label"] for o in sc["objects"]})
        classes = [present[int(rng.integers(0, len(present)))]]
        if rng.random() < 0.3:
            classes.append([s for s in SHAPES if s not in classes][int(rng.integers(0, 2))])
    det_text, det_objs = detect_target(sc, classes)
    shape = "ball" if sc["kind"] == "ball" else sorted({o["label"] for o in sc["objects"]})[
        int(rng.integers(0, len({o["label"] for o in sc["objects"]})))]
    if sc["kind"] != "ball" and rng.random() < 0.2:
        shape = SHAPES[int(rng.integers(0, 3))]
    n = sum(o["label"] == shape for o in sc["objects"])
    cp = count_prompt(shape, True)
    truth = {
        "kind": sc["kind"], "width": W, "height": H,
        "objects": [{"label": o["label"], "colour": o["colour"], "box": [round(v, 2) for v in o["box"]]}
                    for o in sc["objects"]],
        "detect": {"prompt": "detect " + " ; ".join(classes), "text": det_text,
                   "boxes": [{"label": o["label"], "x1": round(o["box"][0], 2), "y1": round(o["box"][1], 2),
                              "x2": round(o["box"][2], 2), "y2": round(o["box"][3], 2)} for o in det_objs]},
        "caption": {"prompt": "caption en", "text": caption_of(sc)},
        "count": {"prompt": cp, "shape": shape, "count": n, "text": str(n)},
    }
    return sc, truth



def generate(model, enc: Encoder, arr: np.ndarray, prompt: str, max_new_tokens: int = 48) -> tuple[str, list[int]]:
    import torch

    ids = enc.prefix_ids(prompt)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            token_type_ids=torch.zeros(1, len(ids), dtype=torch.long),
            pixel_values=torch.from_numpy(enc.pixels(arr).transpose(2, 0, 1)[None].copy()),
            do_sample=False, max_new_tokens=max_new_tokens)
    gen = out[0, len(ids):].tolist()
    if enc.eos in gen:
        gen = gen[:gen.index(enc.eos)]
    return enc.tok.decode(gen, skip_special_tokens=True), gen


def evaluate(model, enc: Encoder, seed: int, n: int, log=print, show: int = 0) -> dict:
    model.eval()
    det_tp = det_n = det_fp = 0
    cap_exact = cap_objs = cnt_ok = 0
    ball_tp = ball_n = 0
    t0 = time.time()
    for i in range(n):
        sc, truth = eval_item(np.random.default_rng([seed, i]))
        W, H = sc["width"], sc["height"]
        d_text, _ = generate(model, enc, sc["image"], truth["detect"]["prompt"])
        pred = parse_detections(d_text, W, H)
        gt = [{"label": b["label"], "box": (b["x1"], b["y1"], b["x2"], b["y2"])} for b in truth["detect"]["boxes"]]
        tp, fp = match(pred, gt)
        det_tp += tp
        det_n += len(gt)
        det_fp += fp
        if sc["kind"] == "ball":
            ball_tp += tp
            ball_n += len(gt)
        c_text, _ = generate(model, enc, sc["image"], "caption en")
        cap_exact += c_text == truth["caption"]["text"]
        cap_objs += caption_objects(c_text) == caption_objects(truth["caption"]["text"])
        a_text, _ = generate(model, enc, sc["image"], truth["count"]["prompt"], 4)
        cnt_ok += a_text.strip() == truth["count"]["text"]
        if i < show:
            log(f"  [{i}] {W}x{H} {truth['detect']['prompt']!r}: {d_text!r} (truth {truth['detect']['text']!r})")
            log(f"      caption: {c_text!r} (truth {truth['caption']['text']!r}); "
                f"{truth['count']['prompt']!r}: {a_text!r} (truth {truth['count']['text']!r})")
    model.train()
    return {"frames": n, "det_recall": det_tp / max(det_n, 1), "det_precision": det_tp / max(det_tp + det_fp, 1),
            "ball_recall": ball_tp / max(ball_n, 1), "caption_exact": cap_exact / n,
            "caption_objects": cap_objs / n, "count_acc": cnt_ok / n, "eval_s": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# 6. commands
# ---------------------------------------------------------------------------------------------


def setup_torch(threads: int):
    import logging
    import warnings

    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def cmd_train(args):
    import torch

    setup_torch(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "train.log", "a", buffering=1)

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")

    tok_json, tok_ids = build_demo_tokenizer()
    n_img = (SPEC["vision"]["image_size"] // SPEC["vision"]["patch_size"]) ** 2
    tok_dir = work / "tokenizer"
    write_hf_files(tok_dir, tok_json, tok_ids, SPEC["vision"]["image_size"], n_img)
    enc = Encoder(tok_dir)
    enc.check_against_processor(np.random.default_rng([args.seed, 10 ** 9]))
    model = build_model(tok_ids, args.seed)
    aux = AuxHead(model, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [aux.linear.weight], [aux.linear.bias]
    for name, p in model.named_parameters():
        (no_decay if (p.ndim < 2 or "embed" in name or "norm" in name) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    ckpt = work / "ckpt.pt"
    start = 0
    run_args = {k: v for k, v in vars(args).items() if k not in ("work", "out", "eval_every", "ckpt_every", "threads",
                                                                 "final_eval")}
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        if st["args"] != run_args:
            sys.exit(f"checkpoint {ckpt} was made with other arguments: {st['args']} (delete it to start over)")
        model.load_state_dict(st["model"])
        aux.linear.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        log(f"resumed from {ckpt} at step {start}")
    else:
        if args.init_from:
            init = torch.load(args.init_from, weights_only=False)
            model.load_state_dict(init["model"])
            if "aux" in init:
                aux.linear.load_state_dict(init["aux"])
            log(f"weights from {args.init_from}")
        if args.vision_from:
            pre = torch.load(args.vision_from, weights_only=False)
            model.model.vision_tower.load_state_dict(pre["vision"])
            aux.linear.load_state_dict(pre["aux"])
            log(f"vision tower and auxiliary head from {args.vision_from}")
        log(f"start: {n_params} parameters ({n_params / 1e6:.2f} M), tokens {tok_ids}, spec {SPEC}, args {run_args}")
    model.train()
    t0 = time.time()
    hist = []
    # batches are rendered in a worker process (one per step, from default_rng([seed, step])): same data
    # as rendering them inline, whatever the timing
    loader = torch.utils.data.DataLoader(StepBatches(enc, args.seed, args.batch, start, args.steps,
                                                     (args.p_detect, args.p_detect + args.p_caption)), batch_size=None,
                                         num_workers=1, prefetch_factor=4)
    for step, batch in zip(range(start, args.steps), loader):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, m = loss_fn(model, batch, tok_ids, args.loc_sigma, args.loc_smooth, aux, args.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([*model.parameters(), *aux.linear.parameters()], 1.0).item()
        opt.step()
        hist.append((loss.item(), m["nll"], m["loc_acc"], m["txt_acc"], m["aux_cls_acc"], m["aux_box_l1"]))
        if (step + 1) % 10 == 0:
            h = np.nanmean(np.array(hist), 0)
            hist = []
            log(f"step {step + 1}/{args.steps} loss {h[0]:.4f} nll {h[1]:.4f} loc_acc {h[2]:.3f} txt_acc {h[3]:.3f} "
                f"aux_cls_acc {h[4]:.3f} aux_box_l1 {h[5]:.3f} "
                f"lr {lr:.2e} gnorm {gn:.2f} {(time.time() - t0) / (step + 1 - start):.2f} s/step")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            tmp = work / "ckpt.pt.tmp"
            torch.save({"model": model.state_dict(), "aux": aux.linear.state_dict(), "opt": opt.state_dict(),
                        "step": step + 1, "args": run_args}, tmp)
            os.replace(tmp, ckpt)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            log(f"eval @ {step + 1}: {evaluate(model, enc, 999, 16, log, show=2)}")
    log(f"training done: {args.steps} steps, {time.time() - t0:.0f} s this session")
    out = Path(args.out)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    write_hf_files(out, tok_json, tok_ids, SPEC["vision"]["image_size"], n_img)
    log(f"saved {out}")
    if args.final_eval:
        log(f"final eval ({args.final_eval} held-out frames, seed 1003): "
            f"{evaluate(model, enc, 1003, args.final_eval, log, show=6)}")


def _pool_frame(key: tuple[int, int]):
    sc = render_scene(np.random.default_rng(list(key)))
    size = SPEC["vision"]["image_size"]
    return squash(sc["image"], size), aux_targets(sc, size // SPEC["vision"]["patch_size"])


def pool_part(text: str) -> tuple[int, int]:
    """`--pool SEED:COUNT`."""
    seed, sep, count = text.partition(":")
    try:
        if sep and int(count) > 0:
            return int(seed), int(count)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected SEED:COUNT with a positive COUNT, got {text!r}")


def render_pool(spec: list[tuple[int, int]], workers: int) -> dict[str, np.ndarray]:
    """Frames `SEED:COUNT` (frame i from default_rng([SEED, i])), squashed to the model's size, with their
    per-patch targets; rendered once, in `workers` processes, and reused for every epoch."""
    from multiprocessing import Pool

    keys = [(seed, i) for seed, count in spec for i in range(count)]
    with Pool(workers) as p:
        frames = p.map(_pool_frame, keys, chunksize=64)
    out = {"u8": np.stack([u8 for u8, _ in frames])}
    out.update({k: np.stack([t[k] for _, t in frames]) for k in frames[0][1]})
    return out


def cmd_pretrain_vision(args):
    """Stage 0: the vision tower alone, on the per-patch targets of `AuxHead`. Telling a circle from a square
    takes a ViT this small thousands of steps, and with the decoder in the loop each step costs ten times as
    much (and the signal arrives diluted): here a step is ~0.06 s, on frames rendered once."""
    import torch

    setup_torch(args.threads)
    tok_json, tok_ids = build_demo_tokenizer()
    model = build_model(tok_ids, args.seed)
    aux = AuxHead(model, args.seed)
    vt = model.model.vision_tower
    t0 = time.time()
    pool = render_pool(args.pool, args.workers)
    n = len(pool["u8"])
    n_train = n - args.held_out
    print(f"pool: {n} frames ({n_train} to train on, the last {args.held_out} held out), {time.time() - t0:.0f} s",
          flush=True)

    def batch(idx):
        idx = idx.numpy()
        pix = torch.from_numpy(normalise(pool["u8"][idx]).transpose(0, 3, 1, 2).copy())
        return pix, {k: torch.from_numpy(pool[k][idx]) for k in ("cls", "col", "box", "cov")}

    params = [*vt.parameters(), *aux.linear.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    hist = []
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        pix, t = batch(torch.randint(0, n_train, (args.batch,), generator=g))
        aux.features = vt(pix).last_hidden_state
        loss, m = aux.loss(t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append((loss.item(), m["aux_box_l1"]))
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            with torch.no_grad():
                pix, t = batch(torch.arange(n_train, n))
                aux.features = vt(pix).last_hidden_state
                conf = aux.confusion(t)
            h = np.mean(hist, 0)
            hist = []
            shapes = conf[:3]
            print(f"step {step + 1}/{args.steps} loss {h[0]:.3f} box_l1 {h[1]:.4f} held-out shape accuracy "
                  f"{np.trace(shapes[:, :3]) / shapes.sum():.3f} ball {conf[3, 3] / conf[3].sum():.3f} "
                  f"{(time.time() - t0) / (step + 1):.3f} s/step", flush=True)
    print(f"held-out confusion (rows: true {AUX_CLASSES}):\n{conf}")
    torch.save({"vision": vt.state_dict(), "aux": aux.linear.state_dict(), "args": vars(args)}, args.out)
    print(f"saved {args.out}")


def load_hf(model_dir: Path):
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval(), Encoder(model_dir)


def cmd_export_ckpt(args):
    """The latest checkpoint of a (possibly still running) training as an HF folder."""
    import torch

    setup_torch(args.threads)
    work = Path(args.work)
    st = torch.load(work / "ckpt.pt", weights_only=False)
    tok_json, tok_ids = build_demo_tokenizer()
    model = build_model(tok_ids, st["args"]["seed"])
    model.load_state_dict(st["model"])
    model.eval()
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    n_img = (SPEC["vision"]["image_size"] // SPEC["vision"]["patch_size"]) ** 2
    write_hf_files(out, tok_json, tok_ids, SPEC["vision"]["image_size"], n_img)
    print(f"step {st['step']} of {st['args']['steps']} -> {out}")


def cmd_eval(args):
    setup_torch(args.threads)
    model, enc = load_hf(Path(args.model))
    print(json.dumps(evaluate(model, enc, args.seed, args.n, show=args.show)))


def cmd_generate(args):
    """Greedy generation for one image file (to compare with the Rust engine)."""
    setup_torch(args.threads)
    model, enc = load_hf(Path(args.model))
    with Image.open(args.image) as im:
        arr = np.asarray(im.convert("RGB"))
    text, ids = generate(model, enc, arr, args.prompt, args.max_tokens)
    print(json.dumps({"text": text, "tokens": ids}))


def export_eval(out_dir: Path, n: int, seed: int, max_bytes: int | None = None):
    """N held-out frames (frame i is rendered from default_rng([seed, i])) as PNG + truth.jsonl (one line per
    frame: image, size, objects, and the detect / caption / count prompts with their expected answers; boxes
    in pixels of the original frame). With max_bytes, frames whose PNG is larger are skipped (the index goes
    on), which keeps a small committed set small (it then favours frames without noise)."""
    import io

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    i = 0
    while len(lines) < n:
        sc, truth = eval_item(np.random.default_rng([seed, i]))
        buf = io.BytesIO()
        Image.fromarray(sc["image"]).save(buf, format="PNG", optimize=True)
        i += 1
        if max_bytes is not None and buf.tell() > max_bytes:
            continue
        name = f"frame_{i - 1:04d}.png"
        (out_dir / name).write_bytes(buf.getvalue())
        lines.append(json.dumps({"image": name, "seed": [seed, i - 1], **truth}))
    (out_dir / "truth.jsonl").write_text("\n".join(lines) + "\n")
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {n} frames + truth.jsonl to {out_dir} ({total / 1024:.0f} KiB)")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--export-eval":
        if len(sys.argv) not in (5, 6):
            sys.exit("usage: train_demo.py --export-eval DIR N SEED [MAX_BYTES_PER_FRAME]")
        export_eval(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                    int(sys.argv[5]) if len(sys.argv) == 6 else None)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=6e-4)
    t.add_argument("--min-lr-frac", type=float, default=0.05)
    t.add_argument("--warmup", type=int, default=150)
    t.add_argument("--wd", type=float, default=0.01)
    t.add_argument("--loc-sigma", type=float, default=10.0, help="Gaussian soft target over loc bins (in bins)")
    t.add_argument("--loc-smooth", type=float, default=0.5, help="weight of the soft loc target")
    t.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the training-only per-patch loss on the vision tower (AuxHead); 0 turns it off")
    t.add_argument("--vision-from", default="", help="the vision tower of a `pretrain-vision` run")
    t.add_argument("--init-from", default="", help="start from the weights of this checkpoint (a second stage)")
    t.add_argument("--p-detect", type=float, default=0.6, help="share of detect prompts on shape frames")
    t.add_argument("--p-caption", type=float, default=0.3, help="share of caption prompts on shape frames")
    # one thread: with two, a busy second core (a compile) stalls every parallel region (measured: 0.65 s
    # per step with one thread against 1 to 10 s with two, on a 2-core machine with a build running)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--work", default="/tmp/demo_train")
    t.add_argument("--out", default="/tmp/demo_hf")
    t.add_argument("--eval-every", type=int, default=300)
    t.add_argument("--ckpt-every", type=int, default=25)
    t.add_argument("--final-eval", type=int, default=100)
    v = sub.add_parser("pretrain-vision")
    v.add_argument("--seed", type=int, default=0, help="the model's init (as `train --seed`) and the batch order")
    v.add_argument("--pool", action="append", type=pool_part, default=None,
                   help="SEED:COUNT frames to train on (repeatable; default 51:24000 and 50:12000)")
    v.add_argument("--held-out", type=int, default=512, help="the last frames of the pool, for the accuracy")
    v.add_argument("--steps", type=int, default=8000)
    v.add_argument("--batch", type=int, default=32)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--warmup", type=int, default=50)
    v.add_argument("--threads", type=int, default=2)
    v.add_argument("--workers", type=int, default=2, help="processes rendering the pool")
    v.add_argument("--out", default="/tmp/demo_vision.pt")
    e = sub.add_parser("eval")
    e.add_argument("--model", default="/tmp/demo_hf")
    e.add_argument("--n", type=int, default=100)
    e.add_argument("--seed", type=int, default=1003)
    e.add_argument("--show", type=int, default=4)
    e.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("generate")
    g.add_argument("--model", default="/tmp/demo_hf")
    g.add_argument("--image", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--threads", type=int, default=1)
    x = sub.add_parser("export-ckpt")
    x.add_argument("--work", default="/tmp/demo_train")
    x.add_argument("--out", default="/tmp/demo_hf")
    x.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.cmd == "pretrain-vision" and args.pool is None:
        args.pool = [(51, 24000), (50, 12000)]
    {"train": cmd_train, "pretrain-vision": cmd_pretrain_vision, "eval": cmd_eval, "generate": cmd_generate,
     "export-ckpt": cmd_export_ckpt}[args.cmd](args)


if __name__ == "__main__":
    main()
