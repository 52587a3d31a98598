"""Render a chat template (Jinja, as in HF `tokenizer_config.json` and GGUF `tokenizer.chat_template`).

The environment matches transformers' `apply_chat_template`: a sandboxed, immutable jinja2 environment with
`trim_blocks`/`lstrip_blocks`, the loop-controls extension, `raise_exception`, `strftime_now` and an
unescaped `tojson`. Without a template in the file, a built-in one is the fallback: Kimi-K2's for a vocabulary
with its role tokens, else DeepSeek-V2-Chat's.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lite.errors import LiteError

# DeepSeek-V2-Chat's tokenizer_config.json chat_template, verbatim. It renders system `content + "\n\n"`,
# user `"User: " + content + "\n\n"`, assistant `"Assistant: " + content + eos`, BOS first, and the generation
# prompt "Assistant:" with no trailing space (llama.cpp's built-in "deepseek2" template is the same).
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# llama.cpp's built-in "kimi-k2" template (LLM_CHAT_TEMPLATE_KIMI_K2), for a Kimi-K2 file without a template of its
# own: each turn is "<|im_user|>user<|im_middle|>" + content + "<|im_end|>" (system and assistant alike, a tool's
# reply under <|im_system|>, an unknown role's content bare), with no BOS and no default system prompt; the
# generation prompt is the assistant's header. The model ends its turn with <|im_end|> (see Tokenizer.eog_ids).
KIMI_K2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|im_system|>system<|im_middle|>"
    "{% elif message['role'] == 'user' %}<|im_user|>user<|im_middle|>"
    "{% elif message['role'] == 'assistant' %}<|im_assistant|>assistant<|im_middle|>"
    "{% elif message['role'] == 'tool' %}<|im_system|>tool<|im_middle|>"
    "{% endif %}{{ message['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)
_KIMI_K2_TOKENS = {"<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>"}


def default_chat_template(special_tokens: set[str]) -> str:
    """The built-in template for a file without one, chosen by its special (non-normal) tokens' texts: Kimi-K2's
    for a vocabulary with Kimi's role tokens, else DeepSeek-V2-Chat's."""
    return KIMI_K2_CHAT_TEMPLATE if _KIMI_K2_TOKENS <= special_tokens else DEEPSEEK_V2_CHAT_TEMPLATE


class _TemplateError(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LiteError(f"the chat template does not parse ({e.message}, line {e.lineno}); fix or omit it") from None


def render_chat_template(
    messages: list[dict[str, Any]],
    template: str | None = None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}]) with `template` (None: DeepSeek-V2-Chat's template)."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LiteError(f"bad chat message {m!r}; each message needs a 'role' and a 'content'")
    compiled = _compile(template if template else DEEPSEEK_V2_CHAT_TEMPLATE)
    try:
        return compiled.render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except _TemplateError as e:
        raise LiteError(f"the chat template rejected the conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise LiteError(f"the chat template failed to render ({e}); fix the template or the messages") from None
