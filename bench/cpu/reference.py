"""The PyTorch side of `kino bench`: times one component of diffusers at full size with random
weights, on the CPU in f32, and prints one JSON line {"seconds", "peak_rss_bytes"}.

usage: python reference.py transformer|vae|attention THREADS [TOKENS [PROMPT_TOKENS]]

PROMPT_TOKENS (transformer, default 512): the text context's rows after it are zeros, as Wan's
pipelines pad a prompt's embeddings to 512 tokens.
"""

import json
import resource
import sys
import time

import torch

what, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)

with torch.no_grad():
    if what == "transformer":
        from diffusers import WanTransformer3DModel

        # Wan2.1-T2V-1.3B transformer/config.json
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ).eval()
        x = torch.randn(1, 16, 5, 32, 32)
        t = torch.tensor([500.0])
        ctx = torch.randn(1, 512, 4096)
        prompt_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 512
        ctx[:, prompt_tokens:] = 0
        start = time.perf_counter()
        model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
        seconds = time.perf_counter() - start
    elif what == "vae":
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan().eval()  # Wan2.1 VAE config (the class defaults)
        z = torch.randn(1, 16, 5, 32, 32)
        start = time.perf_counter()
        model.decode(z, return_dict=False)
        seconds = time.perf_counter() - start
    elif what == "attention":
        # The self-attention of Wan2.1-1.3B (12 heads of 128) over TOKENS tokens: diffusers' Wan
        # attention processor calls this (`dispatch_attention_fn`, native backend); the tensors
        # are given in its own [B, H, N, D] layout, contiguous.
        n = int(sys.argv[3]) if len(sys.argv) > 3 else 32760
        q, k, v = (torch.randn(1, 12, n, 128) for _ in range(3))
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        seconds = time.perf_counter() - start
    else:
        raise SystemExit(f"unknown component {what}")

peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# The instruction set ATen's kernels ran with (`kino bench` caps it, with oneDNN's and MKL's, when
# Kino runs capped by KINO_CPU_ISA).
capability = torch.backends.cpu.get_cpu_capability()
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "cpu_capability": capability}))
