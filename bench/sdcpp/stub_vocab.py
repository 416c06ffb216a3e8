"""Writes the tokenizer headers a stable-diffusion.cpp snapshot lacks (its generated
src/tokenizers/vocab/*.hpp, megabytes each, are missing from some mirrors), so that `sd-cli`
builds for the benchmark:

    python bench/sdcpp/stub_vocab.py SRC

UMT5's header (the only tokenizer the Wan benchmark runs) is written from the fixture's 300-piece
tokenizer (`fixtures/data/text-encoder/tokenizer/tokenizer.json`), its pre-tokenizer given as the
single `Metaspace` that stable-diffusion.cpp reads, so the empty prompt becomes ids below 300, as
`make_umt5.py`'s 300-row embedding expects. Every other missing header gets an empty string (those
tokenizers are not used). Headers that exist are left alone. A real clone of the repository has
them all and needs none of this.
"""

import json
import pathlib
import sys

# header file -> the C array names it defines (see SRC/src/tokenizers/vocab/vocab.cpp)
HEADERS = {
    "clip_merges.hpp": ["clip_merges_utf8_c_str"],
    "gemma2_merges.hpp": ["gemma2_merges_utf8_c_str"],
    "gemma2_vocab.hpp": ["gemma2_vocab_json_utf8_c_str"],
    "gemma_merges.hpp": ["gemma_merges_utf8_c_str"],
    "gemma_vocab.hpp": ["gemma_vocab_json_utf8_c_str"],
    "gpt_oss_merges.hpp": ["gpt_oss_merges_utf8_c_str"],
    "gpt_oss_vocab.hpp": ["gpt_oss_vocab_json_utf8_c_str"],
    "mistral_merges.hpp": ["mistral_merges_utf8_c_str"],
    "mistral_vocab.hpp": ["mistral_vocab_json_utf8_c_str"],
    "qwen_merges.hpp": ["qwen2_merges_utf8_c_str"],
    "t5.hpp": ["t5_tokenizer_json_str"],
    "umt5.hpp": ["umt5_tokenizer_json_str"],
}

ROOT = pathlib.Path(__file__).resolve().parents[2]


def c_array(name: str, data: bytes) -> str:
    body = ",".join(f"0x{b:02x}" for b in data) or "0x00"
    return f"static const unsigned char {name}[] = {{\n{body},\n}};\n"


def umt5_json() -> bytes:
    t = json.loads((ROOT / "fixtures/data/text-encoder/tokenizer/tokenizer.json").read_text())
    out = {
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
        "model": {
            "unk_id": t["model"]["unk_id"],
            "vocab": [[p, float(s)] for p, s in t["model"]["vocab"]],
        },
    }
    return json.dumps(out, ensure_ascii=False).encode()


def main(src: str) -> None:
    vocab = pathlib.Path(src) / "src/tokenizers/vocab"
    if not (vocab / "vocab.cpp").is_file():
        sys.exit(f"{vocab}/vocab.cpp not found: is {src} a stable-diffusion.cpp source tree?")
    for header, names in HEADERS.items():
        path = vocab / header
        if path.exists() and path.stat().st_size > 0:
            continue
        data = umt5_json() if header == "umt5.hpp" else b""
        path.write_text("".join(c_array(n, data) for n in names))
        print(f"wrote {path} ({'the fixture UMT5 tokenizer' if data else 'empty'})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
