"""quant.gguf_file / quant.gguf_header: a GGUF header is validated before it is trusted. Truncated and corrupt
files raise one LiteError line saying where they break; a fuzz run over mutated headers of a tiny real GGUF
ends every case in LiteError or success."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from lite.errors import LiteError
from quant.formats import quantize
from quant.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType


def write_tiny(path: Path) -> Path:
    """A small GGUF made by gguf-py's writer: scalars of several types, string and int arrays, and tensors in
    F32, F16, Q8_0 and Q4_K (about 1 KiB of header, 400 bytes of data)."""
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_float32("deepseek2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_int64("x.big", -(2**40))
    w.add_token_list(["a", "b", "<s>", "é", "世界"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 1, 1])
    w.add_string("general.name", "tiny")
    rows = np.linspace(-1, 1, 2 * 256, dtype=np.float32).reshape(2, 256)
    w.add_tensor("a.weight", np.arange(8, dtype=np.float32))
    w.add_tensor("b.weight", np.ones((4, 4), dtype=np.float16))
    for name, qtype in (("c.weight", Q.Q8_0), ("d.weight", Q.Q4_K)):
        raw = quantize(rows, qtype).reshape(2, -1)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, bytes, GGUFFile]:
    path = write_tiny(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, path.read_bytes(), GGUFFile(path)


def error_of(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(LiteError) as e:
        GGUFFile(p)
    assert "\n" not in str(e.value)
    return str(e.value).replace(str(p), "F")


def test_tiny_file_reads_back(tiny):
    _, _, f = tiny
    assert f.metadata["deepseek2.context_length"] == 512 and f.metadata["x.big"] == -(2**40)
    assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "<s>", "é", "世界"]
    assert f.metadata["tokenizer.ggml.add_bos_token"] is True
    assert [(t.name, t.qtype, t.shape) for t in f.tensors.values()] == [
        ("a.weight", Q.F32, (8,)), ("b.weight", Q.F16, (4, 4)), ("c.weight", Q.Q8_0, (2, 256)),
        ("d.weight", Q.Q4_K, (2, 256)),
    ]  # fmt: skip
    assert np.frombuffer(f.tensors["a.weight"].data, np.float32).tolist() == list(range(8))


def field_at(data: bytes, key: str) -> int:
    """Byte offset of the value type of metadata `key` (just after its name)."""
    name = key.encode()
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


def tensor_info_at(data: bytes, name: str) -> int:
    """Byte offset of the n_dims field of tensor info `name`."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def test_truncated_data_says_where(tiny, tmp_path):
    _, data, f = tiny
    last = f.tensors["d.weight"]
    end = last.offset + last.nbytes
    assert error_of(tmp_path, data[: end - 10]) == (
        f"F is truncated at byte {end - 10} (expected {end} bytes): the data of tensor 'd.weight' at byte "
        f"{last.offset} runs past the end of the file; download or convert it again"
    )


def test_truncated_header(tiny, tmp_path):
    _, data, _ = tiny
    at = field_at(data, "tokenizer.ggml.tokens")
    msg = error_of(tmp_path, data[: at + 20])
    assert msg.startswith(f"F is truncated at byte {at + 20} (expected at least ")
    assert "the array 'tokenizer.ggml.tokens' (5 items)" in msg
    assert error_of(tmp_path, data[:6]).startswith("F is truncated at byte 6 (expected at least 8): the format version")
    assert error_of(tmp_path, b"").startswith("F is empty (0 bytes)")


def info_start(data: bytes, name: str) -> int:
    return tensor_info_at(data, name) - 8 - len(name)


# (field to overwrite, struct format, value, expected message): {size} is the file size, {at} the overwritten
# field, {info} the start of the tensor info the field belongs to
CORRUPTIONS = [
    (lambda d: 16, "<Q", 2**63, "F is truncated at byte {size} (expected at least "),  # metadata count
    (lambda d: 8, "<Q", 2**64 - 1, "F is truncated at byte {size} (expected at least "),  # tensor count
    (
        lambda d: field_at(d, "general.name"),
        "<I",
        99,
        "F is corrupt at byte {at}: 'general.name' has unknown value type 99; download or convert it again",
    ),
    (lambda d: field_at(d, "general.name") + 4, "<Q", 2**62, "F is truncated at byte {size} (expected at least "),
    (
        lambda d: tensor_info_at(d, "b.weight"),
        "<I",
        7,
        "F is corrupt at byte {at}: tensor 'b.weight' has 7 dimensions; GGUF allows 1 to 4",
    ),
    (
        lambda d: tensor_info_at(d, "b.weight") + 4,
        "<Q",
        0,
        "F is corrupt at byte {info}: tensor 'b.weight' has shape [0, 4]; each dimension must be at least 1",
    ),
    (
        lambda d: tensor_info_at(d, "b.weight") + 4,
        "<Q",
        2**62,
        "F is corrupt at byte {info}: tensor 'b.weight' has "
        "shape [4611686018427387904, 4]; each dimension must be at least 1",
    ),  # 2^62 x 4 overflows int64
    (
        lambda d: tensor_info_at(d, "c.weight") + 20,
        "<I",
        200,
        "F is corrupt at byte {info}: tensor 'c.weight' has unknown type 200",
    ),
    (
        lambda d: tensor_info_at(d, "c.weight") + 4,
        "<Q",
        100,
        "F is corrupt at byte {info}: tensor 'c.weight' has rows of 100 values, not whole Q8_0 blocks of 32",
    ),
    (
        lambda d: tensor_info_at(d, "c.weight") + 24,
        "<Q",
        8,
        "F is corrupt at byte {info}: tensor 'c.weight' starts at data offset 8, not a multiple of the alignment 32",
    ),
    (
        lambda d: tensor_info_at(d, "c.weight") + 24,
        "<Q",
        0,
        "tensor 'c.weight' overlaps tensor 'a.weight' in the data region",
    ),
    (lambda d: tensor_info_at(d, "d.weight") + 24, "<Q", 2**40, "F is truncated at byte {size} (expected "),
    (lambda d: 4, "<I", 1, "F is GGUF version 1; lite reads versions 2 and 3, convert it again"),
    (lambda d: 4, "<I", 3 << 24, "F is a big-endian GGUF file; lite reads little-endian ones"),
]


@pytest.mark.parametrize("where, fmt, value, message", CORRUPTIONS)
def test_corrupt_header_fields(tiny, tmp_path, where, fmt, value, message):
    _, data, _ = tiny
    at = where(data)
    starts = [info_start(data, n) for n in ("a.weight", "b.weight", "c.weight", "d.weight")]
    info = max((s for s in starts if s < at), default=0)
    msg = error_of(tmp_path, patch(data, at, fmt, value))
    assert message.format(size=len(data), at=at, info=info) in msg, msg


def test_duplicate_key_and_bad_utf8(tiny, tmp_path):
    _, data, _ = tiny
    twice = data.replace(b"tokenizer.ggml.tokens", b"deepseek2.block_count")  # same length: a second block_count
    assert error_of(tmp_path, twice) == (
        f"F is corrupt at byte {data.index(b'tokenizer.ggml.tokens') - 8}: metadata key 'deepseek2.block_count' "
        "appears twice; download or convert it again"
    )
    bad = data.replace(b"general.name", b"general.n\xffme", 1)
    assert error_of(tmp_path, bad) == (
        f"F is corrupt at byte {data.index(b'general.name') - 8}: the name of metadata key 8 is not UTF-8 text; "
        "download or convert it again"
    )


def test_directories_and_missing_files(tmp_path):
    with pytest.raises(LiteError, match=r"is a directory, not a GGUF file; pass the \.gguf file itself"):
        GGUFFile(tmp_path)
    with pytest.raises(LiteError, match="GGUF file not found"):
        GGUFFile(tmp_path / "nope.gguf")


# -- fuzz ------------------------------------------------------------------------------------------------------

FUZZ_CASES = 5000
EXTREMES = [0, 1, 2, 7, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def mutate(data: bytes, header_end: int, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    at = rng.randrange(header_end)
    if kind == 0:  # flip a few bits in the header
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
    elif kind == 1:  # an extreme integer over a (likely) length, count, type or offset field
        width = rng.choice((4, 8))
        at -= at % width
        b[at : at + width] = (rng.choice(EXTREMES) % (1 << 8 * width)).to_bytes(width, "little")
    elif kind == 2:  # truncate anywhere
        del b[rng.randrange(len(b)) :]
    elif kind == 3:  # drop or insert a few header bytes (everything after shifts)
        n = rng.randint(1, 16)
        b[at:at] = bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else b""
        del b[at : at + (0 if len(b) > len(data) else n)]
    elif kind == 4:  # random bytes over a stretch of the header
        n = rng.randint(1, 32)
        b[at : at + n] = bytes(rng.randrange(256) for _ in range(min(n, len(b) - at)))
    else:  # a small integer nudge (off-by-one lengths and counts)
        width = rng.choice((4, 8))
        at -= at % width
        v = int.from_bytes(b[at : at + width], "little") + rng.choice((-2, -1, 1, 2, 64))
        b[at : at + width] = (v % (1 << 8 * width)).to_bytes(width, "little")
    return bytes(b)


def test_fuzz_mutated_headers_end_in_lite_error_or_success(tiny, tmp_path):
    _, data, f = tiny
    rng = random.Random(11)
    outcomes = {"ok": 0, "error": 0}
    failures = []
    for case in range(FUZZ_CASES):
        mutated = mutate(data, f.header.data_offset, rng)
        path = tmp_path / f"case{case}.gguf"
        path.write_bytes(mutated)
        try:
            g = GGUFFile(path)
            for t in g.tensors.values():  # what a loader touches first: every view is whole
                assert t.data.nbytes == t.nbytes and t.offset + t.nbytes <= len(mutated)
                end = t.offset + t.nbytes
                assert t.n_elements >= 1 and bytes(t.data[-1:]) == mutated[end - 1 : end]
            outcomes["ok"] += 1
        except LiteError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            failures.append((case, type(e).__name__, str(e)[:120]))
        finally:
            g = None
            os.unlink(path)
    assert not failures, failures[:10]
    assert outcomes["ok"] > FUZZ_CASES // 20 and outcomes["error"] > FUZZ_CASES // 2, outcomes
