"""Chat rendering shared by training and serving.

A tokenizer without a chat template (raylm's own trained tokenizer, GPT-2's) gets
`DEFAULT_CHAT_TEMPLATE`: `load_tokenizer` attaches it, so every checkpoint and export carries it
in tokenizer_config.json and vLLM renders a served prompt exactly as training rendered it.
The assistant's turns sit in `{% generation %}` blocks, which is what lets
`apply_chat_template(..., return_assistant_tokens_mask=True)` find the tokens to train on.
"""

from __future__ import annotations

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


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give a tokenizer without a chat template the default one (in place); returns it."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer
