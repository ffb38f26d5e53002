"""Chat templates a merge config can name (`chat_template: chatml`), or literal Jinja text.

The names are the ones mergekit ships (alpaca, chatml, exaone, llama3, mistral) plus `auto`,
so a mergekit config keeps its meaning; the templates below are written for fastmerge and
render each family's standard prompt format. mergekit's rule for telling a name from Jinja
text is kept: a short single line without `{` is a name, and anything else must look like a
template (contain `{` and be at least 20 characters), so a typo in a name is an error instead
of a one-word template.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import ConfigError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set text = (system + '\\n\\n' + message['content']) if (loop.first and system is not none) else message['content'] %}"
    "{{ ' [INST] ' + text + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral template: only user, assistant and a leading system role') }}"
    "{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{% if systems %}{{ systems[-1]['content'] | trim }}{% endif %}{{ '\\n\\n' }}"
    "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
    "{% for message in messages if message['role'] in headers %}"
    "{{ headers[message['role']] + '\\n' + (message['content'] | trim) }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)

EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

NAMED_TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}
AUTO = "auto"


def looks_like_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str) -> None:
    """Config-time check: a known name, `auto`, or text that can be a Jinja template."""
    if looks_like_name(value):
        if value != AUTO and value not in NAMED_TEMPLATES:
            raise ConfigError(
                f"`chat_template: {value}` is not a known template name; use one of "
                f"{', '.join(sorted(NAMED_TEMPLATES))}, `auto`, or literal Jinja text"
            )
    elif len(value) < 20 or "{" not in value:
        raise ConfigError(f"`chat_template` {value!r} is neither a template name nor Jinja text")


def resolve_chat_template(value: str, model_dirs: list[Path]) -> str | None:
    """The Jinja text to write. `auto` picks the template most input models use (ties: the
    first model's), and gives None when no input model has one."""
    check_chat_template(value)
    if value == AUTO:
        found = [t for t in (model_chat_template(d) for d in model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED_TEMPLATES.get(value, value)


def model_chat_template(directory: Path) -> str | None:
    """A model's own chat template: chat_template.jinja (newer transformers), else
    tokenizer_config.json's `chat_template` (a string, or a list of named templates)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def write_chat_template(directory: Path, template: str) -> None:
    """Put the template in the output's tokenizer_config.json. Template files copied from the
    donor go, since transformers prefers them over tokenizer_config.json when loading."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in ("chat_template.jinja", "chat_template.json"):
        (directory / name).unlink(missing_ok=True)
