"""Parity of lite's f32 GGUF against transformers on the tiny configs (max|err| / max|logit|, top-1 agreement).

python benchmarks/parity.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_model import reference_logits  # patched for norm_topk_prob, which transformers 5 ignores
from tiny_models import make_checkpoint

import lite
from lite.convert import convert

TOK = [0, 5, 17, 300, 42, 7, 99, 100, 101, 3, 250, 11, 8, 400, 77, 2]
d = Path(tempfile.mkdtemp())
for kind in ("lite", "v2", "plain", "v3", "moonlight", "kimi"):
    hf = make_checkpoint(d / kind, kind, seed=1)
    convert(hf, d / f"{kind}.gguf", outtype="f32")
    ours = lite.load(str(d / f"{kind}.gguf"), device="cpu").logits(TOK)
    ref = reference_logits(hf, TOK)
    rel = float((ours - ref).abs().max() / ref.abs().max())
    top1 = int((ours.argmax(-1) == ref.argmax(-1)).sum())
    print(f"{kind:10s} max|err|/max|logit| {rel:.2e}  top-1 {top1}/{len(TOK)}")
