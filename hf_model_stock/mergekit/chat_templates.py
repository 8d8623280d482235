"""Chat templates for the format names a mergekit config may give as ``chat_template`` (``chatml``,
``llama3``, ``mistral``, ``alpaca``): our own Jinja for each format's published layout, so that such a
config runs here. A template names the format's special tokens as text; whether the merged tokenizer
has them as single tokens is the vocabulary's business (``tokenizer_source``), as in mergekit."""

from __future__ import annotations

BUILTIN = {
    # <|im_start|>role\ncontent<|im_end|>\n per message; the assistant's header as generation prompt
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
               " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    # Llama 3: a header per message, content trimmed, each ended by <|eot_id|>; bos first
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    # Mistral instruct: [INST] user [/INST] assistant</s>; a system message goes before the first user turn
    "mistral": ("{{ bos_token }}{% set system = messages | selectattr('role', 'equalto', 'system') | "
                "map(attribute='content') | list %}{% for message in messages if message['role'] != 'system' %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + ((system | join('\\n\\n') + '\\n\\n') "
                "if loop.first and system else '') + message['content'] + ' [/INST]' }}"
                "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    # Alpaca: ### Instruction: / ### Response: blocks, a system message as the preamble
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
               "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
               "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
}
