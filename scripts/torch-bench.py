#!/usr/bin/env python3
"""Times transformers' PaliGemma 2 stage by stage on random weights of a published
shape, in bf16 on the CPU: the anchor `paligemma bench` is compared with in the same
sitting (docs/performance.md). The stages are ours: vision tower and projector, the
prefix (image tokens, <bos>, a 3-token prompt) through the decoder, then greedy decode
steps with the KV cache. Medians of --reps after one warm-up.

    scripts/torch-bench.sh --threads 2      # makes the environment, then runs this
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

# PaliGemma 2's published shapes: SigLIP So400m/14 and the Gemma 2 decoders.
GEMMA2 = {
    "3b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "10b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
}
VOCAB, IMAGE_TOKEN, BOS = 257216, 257152, 2


def config(shape: str) -> PaliGemmaConfig:
    _, size, px = shape.split("-")
    text = dict(model_type="gemma2", vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=8192,
                hidden_activation="gelu_pytorch_tanh", sliding_window=4096, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=BOS, **GEMMA2[size])
    text["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text["num_hidden_layers"])]
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, patch_size=14, image_size=int(px), layer_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vocab_size=VOCAB,
                          projection_dim=text["hidden_size"], hidden_size=text["hidden_size"])
    cfg.vision_config.projection_dim = text["hidden_size"]
    return cfg


def timed(f):
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="pg2-3b-224", help="pg2-3b-224, pg2-3b-448, pg2-3b-896, pg2-10b-224")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=20)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = config(a.shape)
    torch.set_default_dtype(torch.bfloat16)
    model, load_s = timed(lambda: PaliGemmaForConditionalGeneration(cfg).eval())
    n_img = cfg.text_config.num_image_tokens
    ids = torch.tensor([[IMAGE_TOKEN] * n_img + [BOS, 1000, 2000, 108]])
    size = cfg.vision_config.image_size
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    vision, prefill, decode = [], [], []
    with torch.inference_mode():
        for rep in range(a.reps + 1):
            _, v = timed(lambda: model.model.get_image_features(pixel_values=pixels))
            out, ttft = timed(lambda: model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1))
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(a.decode_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            d = time.perf_counter() - start
            if rep > 0:
                vision.append(v)
                prefill.append(ttft - v)
                decode.append(a.decode_tokens / d)
    n = ids.shape[1]
    r = dict(shape=a.shape, torch=torch.__version__, threads=a.threads, init_s=load_s, prefix_tokens=n,
             vision_s=statistics.median(vision), prefill_s=statistics.median(prefill),
             prefill_tokens_per_s=n / statistics.median(prefill), decode_tokens_per_s=statistics.median(decode),
             peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    r["frame_s"] = r["vision_s"] + r["prefill_s"] + 20 / r["decode_tokens_per_s"]
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"torch {r['torch']} bf16, {a.shape}, {a.threads} threads, medians of {a.reps}")
        print(f"vision  {r['vision_s']:8.2f} s")
        print(f"prefill {r['prefill_s']:8.2f} s ({n} tokens, {r['prefill_tokens_per_s']:.1f} tokens/s)")
        print(f"decode  {r['decode_tokens_per_s']:8.2f} tokens/s")
        print(f"frame   {r['frame_s']:8.2f} s (vision + prefill + 20 tokens)")
        print(f"peak RSS {r['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
