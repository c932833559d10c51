"""Chat rendering shared by training and serving.

A tokenizer without a chat template (raylm's own trained tokenizer, GPT-2's) gets
`DEFAULT_CHAT_TEMPLATE`: `load_tokenizer` attaches it, so every checkpoint and export carries it
in tokenizer_config.json and vLLM renders a served prompt exactly as training rendered it.
The assistant's turns sit in `{% generation %}` blocks, which is what lets
`apply_chat_template(..., return_assistant_tokens_mask=True)` find the tokens to train on.
"""

from __future__ import annotations

import os
from typing import Any

# One "role: content" line per message; the assistant's content ends with EOS so a model learns
# to stop. The generation prompt is "assistant:" (the content starts with a space).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'] + ':' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- ' ' + message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- ' ' + message['content'] -}}"
    "{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant:' -}}{%- endif -%}"
)


# ChatML (as Qwen and many others render it), for a base model that has no template of its own.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
BUILTIN = {"raylm": DEFAULT_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}


def chat_template_text(name_or_file: str) -> str:
    """data.chat_template: a built-in's text, or a Jinja file's."""
    if name_or_file in BUILTIN:
        return BUILTIN[name_or_file]
    with open(os.path.expanduser(name_or_file), encoding="utf-8") as f:
        return f.read()


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give a tokenizer without a chat template the default one (in place); returns it."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer
