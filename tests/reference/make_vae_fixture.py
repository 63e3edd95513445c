#!/usr/bin/env python3
"""Reference fixture for big_vision's PaliGemma segmentation VQ-VAE decoder (see tests/reference/README.md).

Run from the repository root in the reference environment (torch + numpy + Pillow, CPU only):

    python tests/reference/make_vae_fixture.py            # writes tests/fixtures/vae/

It writes

  tests/fixtures/vae/vae-random.npz   random decoder weights in the exact key layout and shapes of
                                      big_vision's `vae-oid.npz` (PyTorch layout, float32, zip STORED)
  tests/fixtures/vae/reference.json   raw 64x64 decoder outputs for six code sequences, pasted masks
                                      (two pasting conventions) on non-square frames, text examples

Everything is deterministic (fixed seed, one thread, fixed zip timestamps): two runs give
byte-identical files.  The script checks itself and fails if a check fails: a second, independent
implementation that transcribes big_vision's Flax decoder (NHWC, the `_get_params` kernel transposes,
`lax.conv_transpose` semantics, float64 numpy) must match the PyTorch module.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "vae"

SEED = 5
NUM_CODES = 128  # codebook entries (<seg000>..<seg127>)
HIDDEN = 128  # channels after decoder.0 and in the residual blocks
UP_CHANNELS = [128, 128, 64, 32, 16]  # in/out channels of the four transposed convs
LOC_DIVISOR = 1023  # big_vision: `bbox = tokens[:, :4] / 1023`
NEAR_ZERO = 2e-4  # resized mask values closer to 0 than this may flip under a 1e-4 decoder error


# ----------------------------------------------------------------------------------------------
# The PyTorch module whose state_dict keys are the keys of vae-oid.npz (decoder half only).
# ----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1),  # .net.0
            nn.ReLU(),  # .net.1
            nn.Conv2d(ch, ch, 3, padding=1),  # .net.2
            nn.ReLU(),  # .net.3
            nn.Conv2d(ch, ch, 1),  # .net.4
        )

    def forward(self, x):
        return x + self.net(x)


class VectorQuantizer(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        # A bare parameter (not nn.Embedding): the real key is `_vq_vae._embedding`, no `.weight`.
        self._embedding = nn.Parameter(torch.zeros(num, dim))


class SegDecoder(nn.Module):
    """codes [B, 16] -> masks [B, 1, 64, 64]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self._vq_vae = VectorQuantizer(NUM_CODES, dim)
        c = UP_CHANNELS
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, HIDDEN, 1),  # 0
            nn.ReLU(),  # 1
            ResBlock(HIDDEN),  # 2
            ResBlock(HIDDEN),  # 3
            nn.ConvTranspose2d(c[0], c[1], 4, stride=2, padding=1),  # 4:  4x4 -> 8x8
            nn.ReLU(),  # 5
            nn.ConvTranspose2d(c[1], c[2], 4, stride=2, padding=1),  # 6:  8x8 -> 16x16
            nn.ReLU(),  # 7
            nn.ConvTranspose2d(c[2], c[3], 4, stride=2, padding=1),  # 8:  16x16 -> 32x32
            nn.ReLU(),  # 9
            nn.ConvTranspose2d(c[3], c[4], 4, stride=2, padding=1),  # 10: 32x32 -> 64x64
            nn.ReLU(),  # 11
            nn.Conv2d(c[4], 1, 1),  # 12
        )

    def quantized(self, codes: torch.Tensor) -> torch.Tensor:
        b = codes.shape[0]
        x = self._vq_vae._embedding[codes.reshape(-1)]  # [B*16, D]
        # 16 codes laid out 4x4 row-major (big_vision reshapes to NHWC [B, 4, 4, D]).
        return x.reshape(b, 4, 4, self.dim).permute(0, 3, 1, 2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantized(codes))


def init_weights(model: SegDecoder, gen: torch.Generator) -> None:
    """He-style random weights; small random biases so a missing bias shows up."""

    def normal(t, std):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)

    d = model.decoder
    normal(model._vq_vae._embedding, 1.0)
    normal(d[0].weight, (2.0 / model.dim) ** 0.5)
    normal(d[0].bias, 0.1)
    for rb in (d[2], d[3]):
        normal(rb.net[0].weight, (2.0 / (HIDDEN * 9)) ** 0.5)
        normal(rb.net[0].bias, 0.05)
        normal(rb.net[2].weight, (2.0 / (HIDDEN * 9)) ** 0.5)
        normal(rb.net[2].bias, 0.05)
        normal(rb.net[4].weight, 0.5 / HIDDEN**0.5)
        normal(rb.net[4].bias, 0.05)
    for i in (4, 6, 8, 10):
        cin = d[i].weight.shape[0]
        # each output pixel of a k4 s2 transposed conv sums 2x2 taps per input channel
        normal(d[i].weight, (2.0 / (cin * 4)) ** 0.5)
        normal(d[i].bias, 0.05)
    normal(d[12].weight, 0.25)
    normal(d[12].bias, 0.0)


def calibrate_last_layer(model: SegDecoder, codes: torch.Tensor) -> dict:
    """Scale/shift decoder.12 so that outputs are centred on 0 and mostly within [-1, 1]."""
    d = model.decoder
    with torch.no_grad():
        d[12].bias.zero_()
        z = model(codes).double().flatten()
        med = z.median().item()
        spread = (z - med).abs().quantile(0.99).item()
        s = 0.95 / spread
        d[12].weight.mul_(s)
        d[12].bias.fill_(-s * med)
    return {"scale": s, "shift": -s * med}


# ----------------------------------------------------------------------------------------------
# Independent implementation: a transcription of big_vision's Flax decoder
# (big_vision/evaluators/proj/paligemma/transfers/segmentation.py: _get_params,
# _quantized_values_from_codebook_indices, ResBlock, Decoder) with lax semantics, float64 numpy.
# ----------------------------------------------------------------------------------------------


def bv_get_params(ckpt: dict) -> dict:
    def transp(kernel):
        return np.transpose(kernel, (2, 3, 1, 0))

    def conv(name):
        return {"bias": ckpt[name + ".bias"], "kernel": transp(ckpt[name + ".weight"])}

    def resblock(name):
        return {"Conv_0": conv(name + ".0"), "Conv_1": conv(name + ".2"), "Conv_2": conv(name + ".4")}

    return {
        "_embeddings": ckpt["_vq_vae._embedding"],
        "Conv_0": conv("decoder.0"),
        "ResBlock_0": resblock("decoder.2.net"),
        "ResBlock_1": resblock("decoder.3.net"),
        "ConvTranspose_0": conv("decoder.4"),
        "ConvTranspose_1": conv("decoder.6"),
        "ConvTranspose_2": conv("decoder.8"),
        "ConvTranspose_3": conv("decoder.10"),
        "Conv_1": conv("decoder.12"),
    }


def lax_conv(x, k, pad, lhs_dilation=1):
    """lax.conv_general_dilated, NHWC x HWIO -> NHWC, window stride 1 (a correlation)."""
    n, h, w, c = x.shape
    kh, kw, ki, ko = k.shape
    assert ki == c, (k.shape, x.shape)
    if lhs_dilation > 1:
        s = lhs_dilation
        xd = np.zeros((n, (h - 1) * s + 1, (w - 1) * s + 1, c), x.dtype)
        xd[:, ::s, ::s, :] = x
        x = xd
    x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((n, oh, ow, ko), np.float64)
    for a in range(kh):
        for b in range(kw):
            y += np.einsum("nhwc,co->nhwo", x[:, a : a + oh, b : b + ow, :], k[a, b])
    return y


def flax_conv(x, p, padding):
    k = p["kernel"].astype(np.float64)
    return lax_conv(x, k, ((padding, padding), (padding, padding))) + p["bias"].astype(np.float64)


def flax_conv_transpose(x, p, strides=2, padding=2):
    """nn.ConvTranspose(kernel_size=(4,4), strides=(2,2), padding=2, transpose_kernel=True).

    Flax's kernel has shape kernel_size + (features, in_features); lax.conv_transpose with
    transpose_kernel=True flips the spatial axes and swaps the two channel axes, then runs a
    conv with lhs_dilation=strides and the explicit padding ((2, 2), (2, 2)).
    """
    k = p["kernel"].astype(np.float64)  # (kh, kw, out, in)
    k = k[::-1, ::-1, :, :]
    k = np.swapaxes(k, 2, 3)  # (kh, kw, in, out) = HWIO
    y = lax_conv(x, k, ((padding, padding), (padding, padding)), lhs_dilation=strides)
    return y + p["bias"].astype(np.float64)


def flax_decoder(params: dict, codes: np.ndarray) -> np.ndarray:
    emb = params["_embeddings"].astype(np.float64)
    b = codes.shape[0]
    x = np.take(emb, codes.reshape(-1), axis=0).reshape(b, 4, 4, emb.shape[1])
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    x = relu(flax_conv(x, params["Conv_0"], 0))
    for r in ("ResBlock_0", "ResBlock_1"):
        orig = x
        x = relu(flax_conv(x, params[r]["Conv_0"], 1))
        x = relu(flax_conv(x, params[r]["Conv_1"], 1))
        x = flax_conv(x, params[r]["Conv_2"], 0)
        x = x + orig
    for i in range(4):
        x = relu(flax_conv_transpose(x, params[f"ConvTranspose_{i}"]))
    x = flax_conv(x, params["Conv_1"], 0)
    return x  # [B, 64, 64, 1]


# ----------------------------------------------------------------------------------------------
# Deliberately wrong variants: how far a plausible implementation mistake moves the output.
# ----------------------------------------------------------------------------------------------


def variant_forward(model: SegDecoder, codes: torch.Tensor, variant: str) -> torch.Tensor:
    d = model.decoder
    x = model.quantized(codes)
    if variant == "grid_column_major":
        x = x.transpose(2, 3)
    x = F.relu(d[0](x))
    for rb in (d[2], d[3]):
        y = rb.net(x)
        x = y if variant == "no_residual_skip" else x + y
    for j, i in enumerate((4, 6, 8, 10)):
        conv = d[i]
        if variant == "convT_kernel_not_flipped":
            # zero-insertion upsample + pad 2 + correlation with the *unflipped* kernel
            w = conv.weight.transpose(0, 1)  # [out, in, 4, 4]
            n, c, h, ww = x.shape
            up = x.new_zeros(n, c, 2 * h - 1, 2 * ww - 1)
            up[:, :, ::2, ::2] = x
            x = F.conv2d(F.pad(up, (2, 2, 2, 2)), w, conv.bias)
        else:
            x = conv(x)
        if not (variant == "no_relu_after_last_convT" and j == 3):
            x = F.relu(x)
    return d[12](x)


# ----------------------------------------------------------------------------------------------
# Pasting a 64x64 mask into a frame.
# ----------------------------------------------------------------------------------------------


def box_px_big_vision(bins, width, height):
    """big_vision evaluator: bbox = tokens / 1023 (float64); map(int, (y1*h, x1*w, y2*h, x2*w))."""
    y1, x1, y2, x2 = (np.asarray(bins, dtype=np.int32) / LOC_DIVISOR).tolist()
    return int(y1 * height), int(x1 * width), int(y2 * height), int(x2 * width)


def box_px_round(bins, width, height):
    """round(bin / 1023 * size) in float64 (half to even; an exact .5 cannot occur with 1023),
    clamped to [0, size]."""

    def r(b, size):
        return min(max(round((b / LOC_DIVISOR) * size), 0), size)

    y1, x1, y2, x2 = bins
    return r(y1, height), r(x1, width), r(y2, height), r(x2, width)


def resize_pil_bilinear(m64: np.ndarray, w: int, h: int) -> np.ndarray:
    img = PIL.Image.fromarray(np.ascontiguousarray(m64, dtype=np.float32))
    assert img.mode == "F"
    return np.asarray(img.resize((w, h), resample=PIL.Image.BILINEAR), dtype=np.float32)


def resize_torch(m64: np.ndarray, w: int, h: int, antialias: bool) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(m64, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
    return out[0, 0].numpy()


def rle_ones(mask: np.ndarray) -> list[int]:
    """Row-major runs of 1s as [start, length, start, length, ...] (start = y * width + x)."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    diff = np.diff(flat)
    starts = np.flatnonzero(diff == 1)
    ends = np.flatnonzero(diff == -1)
    out = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        out += [s, e - s]
    return out


def rle_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    flat = np.zeros(height * width, np.uint8)
    for s, n in zip(rle[0::2], rle[1::2]):
        flat[s : s + n] = 1
    return flat.reshape(height, width)


def paste(m64, bins, width, height, convention):
    if convention == "big_vision_eval":
        y1, x1, y2, x2 = box_px_big_vision(bins, width, height)
    else:
        y1, x1, y2, x2 = box_px_round(bins, width, height)
    frame = np.zeros((height, width), np.uint8)
    info = {"box_px": {"y1": y1, "x1": x1, "y2": y2, "x2": x2}}
    if x2 <= x1 or y2 <= y1:
        info.update(valid=False, resized_hw=[0, 0], ones=0, rle=[], near_zero=[], min_abs_value=None)
        return frame, info, None
    w, h = x2 - x1, y2 - y1
    if convention == "big_vision_eval":
        resized = resize_pil_bilinear(m64, w, h)
    else:
        resized = resize_torch(m64, w, h, antialias=False)
    frame[y1:y2, x1:x2] = resized > 0.0
    yy, xx = np.nonzero(np.abs(resized) < NEAR_ZERO)
    near = sorted(((yy + y1) * width + (xx + x1)).tolist())
    info.update(
        valid=True,
        resized_hw=[h, w],
        ones=int(frame.sum()),
        rle=rle_ones(frame),
        near_zero=near,
        min_abs_value=float(np.abs(resized).min()),
    )
    assert np.array_equal(rle_decode(info["rle"], height, width), frame)
    return frame, info, resized


# ----------------------------------------------------------------------------------------------
# Output helpers.
# ----------------------------------------------------------------------------------------------


def f32_list(a: np.ndarray) -> list[float]:
    """float32 values as the shortest decimal that reads back (as f64, then cast to f32) exactly."""
    out = []
    for v in np.asarray(a, dtype=np.float32).reshape(-1):
        f = float(str(v))
        assert np.float32(f) == v, (v, f)
        out.append(f)
    return out


def dump_json(obj, indent=0) -> str:
    """JSON with lists of scalars on one line."""
    pad = "  " * (indent + 1)
    end = "  " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {dump_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return "[" + ",".join(json.dumps(v) for v in obj) + "]"
        return "[\n" + ",\n".join(pad + dump_json(v, indent + 1) for v in obj) + "\n" + end + "]"
    return json.dumps(obj)


def write_npz(path: Path, arrays: dict) -> None:
    """Like np.savez (uncompressed, one `<key>.npy` per array) but with fixed zip timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr, dtype="<f4"), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def seg_string(codes) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


def loc_string(bins) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512, help="codebook vector size D (vae-oid.npz: 512)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (deleted and rewritten)")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)

    # --- code sequences -------------------------------------------------------------------------
    sequences = {
        "ascending": list(range(16)),
        "all_127": [127] * 16,
        "all_0": [0] * 16,
        "random_a": rng.integers(0, NUM_CODES, 16).tolist(),
        "random_b": rng.integers(0, NUM_CODES, 16).tolist(),
        "alternating_0_127": [0, 127] * 8,
    }
    calib_codes = torch.tensor(
        list(sequences.values()) + rng.integers(0, NUM_CODES, (26, 16)).tolist(), dtype=torch.int64
    )

    # --- weights --------------------------------------------------------------------------------
    model = SegDecoder(args.dim).eval()
    init_weights(model, gen)
    calib = calibrate_last_layer(model, calib_codes)
    state = {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in model.state_dict().items()}

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    npz_path = args.out / "vae-random.npz"
    write_npz(npz_path, state)

    # Reload from disk: the references come from the file's weights, loaded by key.
    loaded = dict(np.load(npz_path))
    assert list(loaded) == list(state), (list(loaded), list(state))
    for k in state:
        assert loaded[k].dtype == np.float32 and np.array_equal(loaded[k], state[k]), k
    ref_model = SegDecoder(args.dim).eval()
    missing, unexpected = ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in loaded.items()}, strict=True)
    assert not missing and not unexpected

    # --- decoder outputs ------------------------------------------------------------------------
    names = list(sequences)
    codes = torch.tensor([sequences[n] for n in names], dtype=torch.int64)
    with torch.no_grad():
        out = ref_model(codes)[:, 0].numpy().astype(np.float32)  # [6, 64, 64]
        batched_one_by_one = np.stack([ref_model(codes[i : i + 1])[0, 0].numpy() for i in range(len(names))])
    assert out.shape == (len(names), 64, 64)
    batch_diff = float(np.abs(out - batched_one_by_one).max())

    flax_out = flax_decoder(bv_get_params(loaded), codes.numpy())[..., 0]
    flax_diff = float(np.abs(flax_out - out.astype(np.float64)).max())
    print(f"torch f32 vs transcribed big_vision Flax decoder (f64): max abs diff {flax_diff:.3g}")
    assert flax_diff < 1e-5, flax_diff

    sensitivity = {}
    with torch.no_grad():
        for variant in ("grid_column_major", "convT_kernel_not_flipped", "no_residual_skip", "no_relu_after_last_convT"):
            v = variant_forward(ref_model, codes, variant)[:, 0].numpy()
            per_seq = np.abs(v - out).reshape(len(names), -1).max(axis=1)
            sensitivity[variant] = {n: float(x) for n, x in zip(names, per_seq)}
        ident = variant_forward(ref_model, codes, "none")[:, 0].numpy()
        assert np.array_equal(ident, out)
    for variant, per in sensitivity.items():
        print(f"  {variant}: per-sequence max abs diff {min(per.values()):.3g} .. {max(per.values()):.3g}")
    # Every variant but the column-major grid must move every sequence far beyond the 1e-4 tolerance
    # (a constant code grid is symmetric under transposition, so all_127/all_0 are excluded there).
    for variant, per in sensitivity.items():
        for n, x in per.items():
            if variant == "grid_column_major" and n in ("all_127", "all_0"):
                continue
            assert x > 1e-2, (variant, n, x)

    outputs = []
    for i, n in enumerate(names):
        o = out[i]
        outputs.append(
            {
                "name": n,
                "codes": sequences[n],
                "min": float(o.min()),
                "max": float(o.max()),
                "mean": float(o.mean()),
                "positive_fraction": float((o > 0).mean()),
                "min_abs": float(np.abs(o).min()),
                "output": f32_list(o),
            }
        )
        print(f"  {n:18s} range [{o.min():+.3f}, {o.max():+.3f}]  mean {o.mean():+.3f}  >0: {(o > 0).mean():.2f}")
        assert 0.1 < (o > 0).mean() < 0.9, (n, (o > 0).mean())
    m64 = {n: out[i] for i, n in enumerate(names)}

    # --- pasting --------------------------------------------------------------------------------
    cases_spec = [
        # name, (width, height), (y1, x1, y2, x2) loc bins, code sequence
        ("photo_320x240", (320, 240), (210, 125, 937, 641), "random_a"),  # upscale both axes
        ("rgb_97x61", (97, 61), (100, 200, 900, 800), "ascending"),  # downscale both axes
        ("edge_full_frame_97x61", (97, 61), (0, 0, 1023, 1023), "random_b"),  # touches all 4 edges
        ("float_edge_93x55", (93, 55), (279, 143, 558, 572), "alternating_0_127"),  # f64 (b/1023)*n < exact
        ("thin_97x61", (97, 61), (300, 300, 305, 600), "random_a"),  # 1 row (trunc) vs empty (round)
    ]
    pil_vs_torch_aa = []
    cases = []
    for name, (width, height), bins, seq in cases_spec:
        case = {
            "name": name,
            "frame": {"width": width, "height": height},
            "box_bins": list(bins),
            "codes_name": seq,
            "codes": sequences[seq],
        }
        frames = {}
        for conv_name in ("big_vision_eval", "round_no_antialias"):
            frame, info, resized = paste(m64[seq], bins, width, height, conv_name)
            frames[conv_name] = frame
            case[conv_name] = info
            if conv_name == "big_vision_eval" and resized is not None:
                h, w = info["resized_hw"]
                aa = resize_torch(m64[seq], w, h, antialias=True)
                pil_vs_torch_aa.append(
                    {
                        "case": name,
                        "max_abs_diff": float(np.abs(aa - resized).max()),
                        "threshold_mismatches": int(((aa > 0) != (resized > 0)).sum()),
                    }
                )
        case["pixels_differing_between_conventions"] = int(
            (frames["big_vision_eval"] != frames["round_no_antialias"]).sum()
        )
        cases.append(case)
        bv, rn = case["big_vision_eval"], case["round_no_antialias"]
        print(
            f"  paste {name}: big_vision box {tuple(bv['box_px'].values())} ones {bv['ones']}; "
            f"round box {tuple(rn['box_px'].values())} ones {rn['ones']}; "
            f"differ {case['pixels_differing_between_conventions']}"
        )
    for c in pil_vs_torch_aa:
        assert c["max_abs_diff"] < 1e-5 and c["threshold_mismatches"] == 0, c

    # --- text examples --------------------------------------------------------------------------
    by_name = {c["name"]: c for c in cases}

    def obj(label, case_name, sep):
        c = by_name[case_name]
        return {
            "text": loc_string(c["box_bins"]) + sep + seg_string(c["codes"]) + " " + label,
            "label": label,
            "box_bins": c["box_bins"],
            "codes": c["codes"],
            "paste_case": case_name,
        }

    o1 = obj("cat", "photo_320x240", "")
    o2 = obj("cat", "rgb_97x61", " ")
    o3 = obj("dog", "edge_full_frame_97x61", " ")
    text_examples = [
        {
            "prompt": "segment cat",
            "frame": by_name["photo_320x240"]["frame"],
            "output": o1["text"],
            "objects": [{k: v for k, v in o1.items() if k != "text"}],
        },
        {
            "prompt": "segment cat ; dog",
            "frame": by_name["rgb_97x61"]["frame"],
            "output": o2["text"] + " ; " + o3["text"],
            "objects": [{k: v for k, v in o.items() if k != "text"} for o in (o2, o3)],
        },
    ]

    # --- reference.json -------------------------------------------------------------------------
    ref = {
        "generator": "tests/reference/make_vae_fixture.py",
        "seed": SEED,
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
        "weights": {
            "file": "vae-random.npz",
            "format": "zip (STORED, no compression) of <key>.npy files, dtype <f4, C order, PyTorch layouts",
            "embedding_dim": args.dim,
            "num_codes": NUM_CODES,
            "keys": {k: list(v.shape) for k, v in state.items()},
            "last_layer_calibration": calib,
        },
        "decoder": {
            "input": "16 codes -> rows of _vq_vae._embedding, laid out 4x4 row-major (code i at row i // 4, col i % 4)",
            "output": "[64, 64] float32, row-major (index = y * 64 + x); = [1, 1, 64, 64] NCHW / big_vision's [1, 64, 64, 1]",
            "check_vs_transcribed_big_vision_flax_f64_max_abs_diff": flax_diff,
            "batch_vs_single_max_abs_diff": batch_diff,
            "sensitivity_max_abs_diff": sensitivity,
        },
        "outputs": outputs,
        "pasting": {
            "loc_divisor": LOC_DIVISOR,
            "near_zero_threshold": NEAR_ZERO,
            "conventions": {
                "big_vision_eval": (
                    "big_vision evaluators/proj/paligemma/transfers/segmentation.py: v = bin / 1023 (f64); "
                    "y1 = int(v_y1 * H), x1 = int(v_x1 * W), y2 = int(v_y2 * H), x2 = int(v_x2 * W) (truncation, "
                    "computed as (bin / 1023.0) * size in f64); invalid if x2 <= x1 or y2 <= y1; "
                    "PIL.Image.fromarray(m64 float32, mode F).resize((x2 - x1, y2 - y1), BILINEAR) "
                    "(= torch bilinear, align_corners=False, antialias=True); > 0; pasted at [y1:y2, x1:x2]"
                ),
                "round_no_antialias": (
                    "y1 = round((bin / 1023.0) * H) etc. in f64 (no .5 ties are possible with 1023), clamped to "
                    "[0, size]; empty if x2 <= x1 or y2 <= y1; torch.nn.functional.interpolate(mode='bilinear', "
                    "align_corners=False, antialias=False) to (y2 - y1, x2 - x1); > 0; pasted at [y1:y2, x1:x2]"
                ),
            },
            "mask_encoding": "rle = [start, length, ...] runs of 1s over the H x W frame in row-major order (start = y * W + x)",
            "pil_vs_torch_antialias_check": pil_vs_torch_aa,
            "cases": cases,
        },
        "text_examples": text_examples,
    }
    (args.out / "reference.json").write_text(dump_json(ref) + "\n")

    for p in sorted(args.out.iterdir()):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        print(f"wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}  {p.stat().st_size} bytes  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
