"""The bundled demo model (lite/data/demo.gguf, made by benchmarks/train_demo.py and `lite convert`).

Greedy generation from a fixed chat prompt must reproduce the recorded tokens, and those tokens must agree
with transformers running the float32 checkpoint until 4-bit rounding makes the two paths part.
The float checkpoint is not committed, so its greedy tokens are recorded here. To re-record after retraining:

    python tests/test_demo_model.py /tmp/demo_ckpt      # prints the constants below
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lite

DEMO = Path(lite.__file__).parent / "data" / "demo.gguf"
MESSAGES = [{"role": "user", "content": "What news from the court, my lord?"}]
N_TOKENS = 48

# --- recorded (the decoded reply: " I'll be a man,\nAnd yet I have been a man, and I'll be\nAs I'll be a man, ...") ---
# fmt: off
PROMPT_IDS = [0, 54, 3267, 27, 1062, 915, 450, 268, 1220, 13, 308, 429, 32, 200, 200, 516, 84, 665, 455, 27]
# lite on demo.gguf (4-bit experts), CPU float32:
LITE_GREEDY = [
    296, 8, 274, 306, 260, 438, 13, 200, 326, 590, 296, 355, 736, 260, 438, 13, 297, 296, 8, 274, 306, 200, 516, 296,
    8, 274, 306, 260, 438, 13, 297, 296, 8, 274, 306, 200, 516, 296, 8, 274, 542, 260, 438, 13, 297, 296, 8, 274
]
# transformers on the float32 checkpoint (benchmarks/train_demo.py, default --steps 400):
FLOAT_GREEDY = [
    296, 8, 274, 321, 13, 296, 8, 274, 306, 260, 438, 13, 200, 326, 590, 296, 355, 736, 260, 438, 13, 297, 296, 8,
    274, 306, 200, 516, 296, 355, 736, 260, 438, 13, 297, 296, 8, 274, 306, 200, 516, 296, 8, 274, 542, 260, 438, 13
]
# fmt: on
# Leading tokens on which the two agree: at the 4th token the float model prefers " not" (" I'll not, I'll be a
# man") by a margin smaller than 4-bit rounding; after it the 4-bit reply is the float reply without those words.
AGREE = 3
# --- end recorded ---


@pytest.fixture(scope="module")
def demo():
    if not DEMO.is_file():
        pytest.fail(f"{DEMO} is missing; make it with benchmarks/train_demo.py and `lite convert`")
    # the recording was made with a float32 latent cache: pinned, so it holds on any CPU (the default is bf16 where
    # the CPU has bf16 instructions: see test_default_cache_agrees_with_float_checkpoint)
    return lite.load(str(DEMO), device="cpu", cache_dtype=torch.float32)


def test_bundled_file_is_small_and_deepseek_v2_shaped(demo):
    assert DEMO.stat().st_size < 20 * 2**20
    c = demo.config
    assert c.n_routed_experts >= 16 and 2 <= c.num_experts_per_tok <= 4 and 1 <= c.n_shared_experts <= 2
    assert c.first_k_dense_replace == 1 and c.num_hidden_layers > 1
    assert demo.metadata["tokenizer.ggml.pre"] == "deepseek-llm"
    assert "Assistant:" in demo.metadata["tokenizer.chat_template"]


def test_chat_prompt_tokens(demo):
    assert demo.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True) == PROMPT_IDS
    assert PROMPT_IDS[0] == demo.tokenizer.bos_id and PROMPT_IDS.count(demo.tokenizer.bos_id) == 1


def test_greedy_generation_reproduces_recording(demo):
    out = list(demo.generate(PROMPT_IDS, max_tokens=N_TOKENS, temperature=0.0))
    assert out == LITE_GREEDY
    assert demo.tokenizer.decode(out).strip()  # a real reply, not only whitespace


def test_recording_agrees_with_float_checkpoint(demo):
    live = list(demo.generate(PROMPT_IDS, max_tokens=AGREE, temperature=0.0))  # not the recording: the model now
    assert AGREE >= 3 and live == FLOAT_GREEDY[:AGREE]
    # Teacher-forced along the float model's own path, the 4-bit model picks the same token almost everywhere.
    logits = demo.logits(PROMPT_IDS + FLOAT_GREEDY[:-1])  # [T, vocab]
    picks = logits[len(PROMPT_IDS) - 1 :].argmax(-1).tolist()
    same = sum(p == f for p, f in zip(picks, FLOAT_GREEDY)) / len(FLOAT_GREEDY)
    assert same >= 0.9, f"top-1 agreement with the float model along its path: {same:.2f}"


def test_default_cache_agrees_with_float_checkpoint():
    """The default latent cache (bf16 on CPUs with bf16 instructions) keeps the demo's greedy start and its top-1
    agreement with the float checkpoint."""
    model = lite.load(str(DEMO), device="cpu")
    assert list(model.generate(PROMPT_IDS, max_tokens=AGREE, temperature=0.0)) == FLOAT_GREEDY[:AGREE]
    picks = model.logits(PROMPT_IDS + FLOAT_GREEDY[:-1])[len(PROMPT_IDS) - 1 :].argmax(-1).tolist()
    assert sum(p == f for p, f in zip(picks, FLOAT_GREEDY)) / len(FLOAT_GREEDY) >= 0.9


def record(ckpt_dir: str) -> None:
    """Print the recorded constants: lite on demo.gguf and transformers on the float checkpoint."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    model = lite.load(str(DEMO), device="cpu")
    prompt = model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ours = list(model.generate(prompt, max_tokens=N_TOKENS, temperature=0.0))
    ref = DeepseekV2ForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    seq, theirs = list(prompt), []
    with torch.no_grad():
        for _ in range(N_TOKENS):  # greedy, full forward each step; stops before eos as lite does
            nxt = int(ref(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == model.eos_token_id:
                break
            theirs.append(nxt)
            seq.append(nxt)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"PROMPT_IDS = {prompt}")
    print(f"LITE_GREEDY = {ours}  # lite, demo.gguf (4-bit experts), CPU float32")
    print(f"FLOAT_GREEDY = {theirs}  # transformers, the float32 checkpoint")
    print(f"AGREE = {agree}  # leading tokens on which the two agree")
    print(f"# lite:  {model.tokenizer.decode(ours)!r}\n# float: {model.tokenizer.decode(theirs)!r}")


if __name__ == "__main__":
    record(sys.argv[1])
