"""Deepen a DeepSeek-V2 GGUF by repeating its MoE layers: a full-depth benchmark file from a shallow one.

    python benchmarks/make_v2lite_shaped.py /tmp/v2lite_shaped --layers 4
    lite convert /tmp/v2lite_shaped -o /tmp/v2lite_shaped.gguf
    python benchmarks/stack_layers.py /tmp/v2lite_shaped.gguf /tmp/v2lite_27.gguf --layers 27

Quantizing a 27-layer random checkpoint to Q4_K takes about an hour here; repeating the quantized bytes of the
shallow file's MoE layers gives a file of DeepSeek-V2-Lite's exact size and shapes in a minute (layer i > 0
takes the tensors of MoE layer 1 + (i - 1) mod n_moe). Its routing repeats with the period of the source's MoE
layers, which changes nothing for dense decode timings (every layer's weights are read once per token).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.gguf_file import GGUFFile  # noqa: E402

BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def stack(src: str, out: str, layers: int) -> None:
    f = GGUFFile(src)
    arch = f.metadata["general.architecture"]
    dense = int(f.metadata[f"{arch}.leading_dense_block_count"])
    n_src = int(f.metadata[f"{arch}.block_count"])
    moe = list(range(dense, n_src))
    w = gguf.GGUFWriter(out, arch)
    skip = {"general.architecture", f"{arch}.block_count"}
    for key, field in f.reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        value = f.metadata[key]
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    w.add_block_count(layers)
    by_layer: dict[int, dict[str, object]] = {}
    outer = []
    for t in f.reader.tensors:  # raw tensors: quantized data in their byte shape
        m = BLOCK.match(t.name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            outer.append(t)

    def add(name: str, t) -> None:
        quantized = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        if quantized:
            w.add_tensor(name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        else:
            w.add_tensor(name, t.data)

    add(outer[0].name, outer[0])  # token_embd first, as llama.cpp writes it
    for i in range(layers):
        src_layer = i if i < dense else moe[(i - dense) % len(moe)]
        for suffix, t in by_layer[src_layer].items():
            add(f"blk.{i}.{suffix}", t)
    for t in outer[1:]:
        add(t.name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=27)
    a = p.parse_args()
    stack(a.src, a.out, a.layers)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
