"""The PyTorch side of `kino bench`: times one component of diffusers at full size with random
weights, on the CPU in f32, and prints one JSON line {"seconds", "peak_rss_bytes"}.

usage: python reference.py transformer|vae|attention THREADS [TOKENS [PROMPT_TOKENS]]

PROMPT_TOKENS (transformer, default 512): the text context's rows after it are zeros, as Wan's
pipelines pad a prompt's embeddings to 512 tokens.

KINO_PROFILE=1 (transformer): also prints to stderr where the forward spent its time, by
modules (forward hooks, inclusive times), named as Kino's own profile spans where they are the
same modules, so `KINO_PROFILE=1 kino bench transformer` shows the two side by side.
"""

import json
import os
import resource
import sys
import time

import torch


def profile_modules(model):
    """Times the blocks' modules by forward hooks; returns a function that prints the table."""
    table = {}

    def hook(name, module):
        def pre(m, args):
            m._kino_t0 = time.perf_counter()

        def post(m, args, out):
            total, calls = table.get(name, (0.0, 0))
            table[name] = (total + time.perf_counter() - m._kino_t0, calls + 1)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for b in model.blocks:
        hook("block.attn1", b.attn1)
        hook("block.attn2", b.attn2)
        hook("block.ffn", b.ffn)
        for attn in (b.attn1, b.attn2):
            for lin in (attn.to_q, attn.to_k, attn.to_v):
                hook("attn q, k, v projections", lin)
            hook("attn.out", attn.to_out[0])
        hook("ffn.net.0 (proj, GELU)", b.ffn.net[0])
        hook("ffn.net.2 (proj)", b.ffn.net[2])

    def report():
        lines = ["profile (KINO_PROFILE; PyTorch, inclusive times of modules by forward hooks)"]
        lines.append(f"{'span':<28} {'total s':>10} {'calls':>8} {'ms per call':>12}")
        for name, (total, calls) in table.items():
            lines.append(f"{name:<28} {total:>10.3f} {calls:>8} {1e3 * total / calls:>12.3f}")
        print("\n".join(lines), file=sys.stderr)

    return report

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
        profiled = os.environ.get("KINO_PROFILE", "0") not in ("", "0")
        report = profile_modules(model) if profiled else None
        start = time.perf_counter()
        model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
        seconds = time.perf_counter() - start
        if report:
            report()
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
