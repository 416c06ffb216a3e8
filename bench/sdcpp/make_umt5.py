"""A one-block UMT5 encoder with Wan's width (d_model 4096, 64 heads, d_ff 10240) and random
weights, in the tensor names of `umt5_xxl_fp16.safetensors` (what stable-diffusion.cpp's
`--t5xxl` reads). Its output only has to have Wan's text width: the benchmark times the
transformer and the VAE, not the text encoder. Its embedding has 300 rows: the benchmark's prompt
is empty, which UMT5's tokenizer (and the fixture's 300-piece one) turns into ids below 300, and
stable-diffusion.cpp pads the text to 512 tokens as Wan does, so the transformer sees 512.

    python make_umt5.py OUT.safetensors
"""

import sys

import numpy as np
from safetensors.numpy import save_file

D, HEADS, FF, VOCAB, BUCKETS = 4096, 64, 10240, 300, 32


def main(out):
    rng = np.random.default_rng(0)

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    p = "encoder.block.0.layer."
    t = {
        "shared.weight": w(VOCAB, D, std=1.0),
        p + "0.SelfAttention.q.weight": w(D, D),
        p + "0.SelfAttention.k.weight": w(D, D),
        p + "0.SelfAttention.v.weight": w(D, D),
        p + "0.SelfAttention.o.weight": w(D, D),
        p + "0.SelfAttention.relative_attention_bias.weight": w(BUCKETS, HEADS),
        p + "0.layer_norm.weight": np.ones(D, np.float16),
        p + "1.DenseReluDense.wi_0.weight": w(FF, D),
        p + "1.DenseReluDense.wi_1.weight": w(FF, D),
        p + "1.DenseReluDense.wo.weight": w(D, FF),
        p + "1.layer_norm.weight": np.ones(D, np.float16),
        "encoder.final_layer_norm.weight": np.ones(D, np.float16),
    }
    save_file(t, out)


if __name__ == "__main__":
    main(sys.argv[1])
