"""Train the bundled demo model: a small DeepSeek-V2 chat model on tinyshakespeare.

    nice python benchmarks/train_demo.py --out /tmp/demo_ckpt          # ~20 min on these 2 cores
    lite convert /tmp/demo_ckpt -o lite/data/demo.gguf                  # default recipe: 4-bit experts
    python benchmarks/train_demo.py --out /tmp/demo_ckpt --hf-perplexity    # float32 perplexity on val.txt
    python benchmarks/train_demo.py --chat-trace trace.jsonl                # routing trace of a chat with the GGUF

The bundled lite/data/demo.gguf was trained with the defaults (400 steps; see benchmarks/README.md, "Demo model").

The corpus's consecutive speaker turns become "User:" / "Assistant:" exchanges in DeepSeek-V2's chat
template, so the model learns to answer a line with a line. The tokenizer is a byte-level BPE trained with
`tokenizers` under DeepSeek LLM's pre-tokenizer rules. The model is transformers' `DeepseekV2ForCausalLM`
(MLA latent attention, 16 routed experts top-2, 2 shared, one leading dense layer), trained with a
Switch-style load-balancing loss. Seeded (data order, init, tokenizer), single process, CPU.
The output folder is a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template) plus val.txt (the held-out split as plain chat text, for
`lite perplexity`) and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# DeepSeek-V2-Chat's tokenizer_config.json template.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: lite/ need not be installed
from lite.tokenizer import deepseek_llm_pre_tokenizer  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt"

MODEL_CONFIG = dict(
    hidden_size=256,  # a multiple of 256: expert gate/up rows quantize to Q4_K
    intermediate_size=768,  # the leading dense layer
    moe_intermediate_size=256,  # expert down rows also Q4_K
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=None,  # V2-Lite style q_proj
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_shared_experts=2,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def speaker_turns(text: str) -> list[str]:
    """The speeches of the corpus in order, without the speaker names ("Name:\\nline\\nline")."""
    turns, pending_name = [], False
    for block in text.strip().split("\n\n"):
        lines = block.strip().split("\n")
        if re.fullmatch(r"[^\n]+:", lines[0]):
            lines, pending_name = lines[1:], len(lines) == 1  # a name alone: its speech is the next block
        elif not pending_name:
            continue
        else:
            pending_name = False
        if lines:
            turns.append("\n".join(line.strip() for line in lines))
    return turns


def conversations(turns: list[str], exchanges: int) -> list[list[dict]]:
    """Consecutive turns as user/assistant pairs, `exchanges` pairs per conversation."""
    convs = []
    step = 2 * exchanges
    for i in range(0, len(turns) - 1, step):
        chunk = turns[i : i + step]
        chunk = chunk[: len(chunk) // 2 * 2]
        roles = ["user", "assistant"] * exchanges
        convs.append([{"role": r, "content": c} for r, c in zip(roles, chunk)])
    return convs


def render(conv: list[dict]) -> str:
    """DeepSeek-V2's chat template, written out (the same string CHAT_TEMPLATE renders)."""
    out = BOS
    for m in conv:
        out += f"User: {m['content']}\n\n" if m["role"] == "user" else f"Assistant: {m['content']}{EOS}"
    return out


def render_plain(conv: list[dict]) -> str:
    """The same conversation as plain text, the special tokens replaced by blank lines (for `lite perplexity`)."""
    return render(conv).replace(BOS, "").replace(EOS, "\n\n")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = deepseek_llm_pre_tokenizer()  # the rules lite.Tokenizer applies to a deepseek-llm GGUF
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": max_len,
        "tokenizer_class": "LlamaTokenizerFast",
    }


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style aux loss, averaged over MoE layers: n_expert * sum_e f_e * P_e (1.0 when balanced)."""
    losses = []
    for logits in router_logits:  # [N, n_expert] per MoE layer
        probs = logits.float().softmax(-1)  # [N, E]
        n_expert = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        f = F.one_hot(chosen, n_expert).sum(1).float().mean(0) / top_k  # [E] fraction of routed slots
        losses.append(n_expert * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch: int, max_windows: int | None = None) -> float:
    """Mean next-token loss over non-overlapping windows of `data`."""
    model.eval()
    starts = list(range(0, len(data) - seq_len - 1, seq_len))[:max_windows]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        x = torch.stack([data[s : s + seq_len] for s in starts[i : i + batch]])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts[i : i + batch]])
        logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=Path("/tmp/demo_ckpt"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-alpha", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=50, help="also save the checkpoint every N steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--hf-perplexity", action="store_true", help="no training: perplexity of the float32 checkpoint "
                   "in --out on its val.txt, with transformers, chunked exactly as `lite perplexity`")  # fmt: skip
    p.add_argument("--ctx", type=int, default=512, help="chunk size for --hf-perplexity (%(default)s)")
    p.add_argument("--chunks", type=int, default=None, help="--hf-perplexity: score at most N chunks (default: all)")
    p.add_argument("--chat-trace", type=Path, metavar="OUT.jsonl", help="no training: record the routing trace of "
                   "a multi-turn chat (user lines from the validation split) with --gguf")  # fmt: skip
    p.add_argument("--gguf", type=Path, default=ROOT / "lite" / "data" / "demo.gguf")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.hf_perplexity:
        hf_perplexity(args.out, args.ctx, args.chunks)
    elif args.chat_trace:
        chat_trace(args)
    else:
        train(args)


def train(args: argparse.Namespace) -> None:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    # Data: the last val_frac of the speeches (contiguous, as in nanoGPT) is held out.
    turns = speaker_turns(args.corpus.read_text(encoding="utf-8"))
    n_val = int(len(turns) * args.val_frac)
    train_convs, val_convs = conversations(turns[:-n_val], 4), conversations(turns[-n_val:], 4)
    tok = train_tokenizer(turns[:-n_val], args.vocab)

    def encode(convs: list[list[dict]]) -> torch.Tensor:
        texts = [render(c) for c in convs]
        return torch.tensor([i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids])

    train_ids, val_ids = encode(train_convs), encode(val_convs)
    print(f"turns {len(turns)}  train tokens {len(train_ids)}  val tokens {len(val_ids)}  vocab {tok.get_vocab_size()}")

    cfg = DeepseekV2Config(
        **MODEL_CONFIG,
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=args.seq_len,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(EOS),
    )
    cfg._attn_implementation = "sdpa"
    model = DeepseekV2ForCausalLM(cfg).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"parameters {n_params / 1e6:.2f}M (routed experts {n_expert / 1e6:.2f}M)")

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def save(steps_done: int, val_loss: float | None) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        tok.save(str(args.out / "tokenizer.json"))
        (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(args.seq_len), indent=2))
        (args.out / "val.txt").write_text("".join(render_plain(c) for c in val_convs), encoding="utf-8")
        metrics = {
            "steps_done": steps_done,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if val_loss is not None else None,
            "train_seconds": time.time() - t_train,
            "total_seconds": time.time() - t_start,
            "params": n_params,
            "routed_expert_params": n_expert,
            "train_tokens": len(train_ids),
            "val_tokens": len(val_ids),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    gen = torch.Generator().manual_seed(args.seed)
    t_train = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts])  # [B, T]
        y = torch.stack([train_ids[s + 1 : s + args.seq_len + 1] for s in starts])
        out = model(input_ids=x, output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        aux = load_balancing_loss(out.router_logits, cfg.num_experts_per_tok)
        loss = lm_loss + args.aux_alpha * aux
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.time() - t_train)
            print(f"step {step:5d}  loss {lm_loss.item():.4f}  aux {aux.item():.3f}  {rate:.2f} step/s", flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            print(f"step {step:5d}  val loss (first 16 windows) {evaluate(model, val_ids, args.seq_len, 8, 16):.4f}")
        if args.save_every and step and step % args.save_every == 0 and step < args.steps - 1:
            save(step + 1, None)  # a partial checkpoint, so a slow run still leaves something to convert
    train_s = time.time() - t_train

    val_loss = evaluate(model, val_ids, args.seq_len, 8)
    save(args.steps, val_loss)
    print(f"final validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}) after {train_s / 60:.1f} min")
    print(f"saved {args.out}")


class _HFSession:
    """The slice of `lite.Session` that `lite.perplexity.perplexity` uses, over transformers (full forwards)."""

    def __init__(self, model, ctx: int):
        self.model, self.ctx, self.tokens = model, ctx, []

    def reset(self) -> None:
        self.tokens = []

    @torch.no_grad()
    def feed(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        self.tokens += list(ids)
        logits = self.model(torch.tensor([self.tokens])).logits[0, -len(ids) :].float()  # [len(ids), vocab]
        return logits if all_logits else logits[-1]


def hf_perplexity(ckpt: Path, ctx: int, chunks: int | None = None) -> None:
    """`lite perplexity`'s numbers for the float32 transformers model: same tokens, chunks and scoring."""
    from transformers import DeepseekV2ForCausalLM

    from lite.convert.tokenizer_meta import tokenizer_metadata_from_hf
    from lite.perplexity import perplexity
    from lite.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(tokenizer_metadata_from_hf(ckpt))  # as `lite convert` writes it
    tokens = tok.encode((ckpt / "val.txt").read_text(encoding="utf-8"), add_bos=True)
    model = DeepseekV2ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    shim = type("HFModel", (), {"session": lambda self, n: _HFSession(model, n)})()
    r = perplexity(shim, tokens, ctx, chunks, bos_id=tok.bos_id)
    print(json.dumps({"model": f"{ckpt} (transformers, float32)", **r.__dict__}))
    print(f"perplexity: {r.ppl:.4f} ± {r.ppl_error:.4f} over {r.chunks} chunks of {ctx} tokens")


def chat_trace(args: argparse.Namespace, n_turns: int = 12, max_tokens: int = 64) -> None:
    """A multi-turn chat with the GGUF, history kept in one latent cache, its routing recorded as a trace."""
    import lite
    from offload.trace import TraceRecorder

    turns = speaker_turns(args.corpus.read_text(encoding="utf-8"))
    user_lines = turns[-int(len(turns) * args.val_frac) :][0::2][:n_turns]
    model = lite.load(str(args.gguf), device="cpu")
    session = model.session()
    messages: list[dict] = []
    with TraceRecorder(args.chat_trace) as rec, rec.attached(model):
        for line in user_lines:
            messages.append({"role": "user", "content": line})
            ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            while len(ids) + max_tokens > session.ctx:  # drop the oldest exchange
                messages = messages[2:]
                ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            reply = list(model.generate(ids, max_tokens=max_tokens, seed=args.seed, session=session))
            messages.append({"role": "assistant", "content": model.tokenizer.decode(reply).strip()})
            print(f"User: {line!r}\nAssistant: {messages[-1]['content']!r}")
    print(f"trace: {rec.lines} MoE-layer calls written to {args.chat_trace}")


if __name__ == "__main__":
    main()
