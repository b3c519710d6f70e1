"""Chat templates for SFT data: a chat (``[{"role", "content"}, ...]``) -> (text, trained, EOS after) parts.

``builtin_parts`` is the built-in template; ``jinja_renderer`` renders a tokenizer folder's Hugging Face
style Jinja ``chat_template`` at every turn boundary, so each assistant turn is exactly the text the
template adds for it; ``resolve_template`` picks one (``prepare.sft``'s docstring describes both).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.sft_format import TOKENIZER_CONFIG_NAME

BUILTIN, TOKENIZER, AUTO = "builtin", "tokenizer", "auto"
TEMPLATES = (AUTO, BUILTIN, TOKENIZER)
TEMPLATE_FILE = "chat_template.jinja"
_RENDER_ERRORS = (TypeError, ValueError, LookupError, AttributeError)  # besides jinja2.TemplateError

Part = tuple[str, bool, bool]  # (text, trained, EOS id after it)
Renderer = Callable[[list[dict[str, str]]], list[Part]]


class TemplateFailure(Exception):
    """A chat template could not render (or split) one record: counted as ``template_error``."""


def builtin_parts(messages: list[dict[str, str]]) -> list[Part]:
    """The built-in chat template (``prepare.sft``'s docstring) as (text, trained, EOS after) parts."""
    parts: list[Part] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            parts += [(f"<|{role}|>\n", False, False), (content, True, True)]
        else:
            parts.append((f"<|{role}|>\n{content}\n", False, False))
    return parts


def _special_text(value: Any) -> str:
    """A token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def read_chat_template(folder: Path) -> str | None:
    """The Jinja chat template of a tokenizer folder (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``, a string or a list holding one named ``default``), or None."""
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    config = _tokenizer_config(folder)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{folder / TOKENIZER_CONFIG_NAME} has a chat_template that is not a string")
    return template


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    """``folder/tokenizer_config.json`` parsed ({} when there is none); unreadable is a one-line DataError."""
    path = folder / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object")
    return config


def jinja_renderer(template: str, folder: Path, tokenizer: Tokenizer, eos: int) -> Renderer:
    """Parts of a chat through a Hugging Face style Jinja ``template`` (``prepare.sft``'s docstring); a template that
    does not compile is a one-line DataError, one that fails on a record raises ``TemplateFailure``."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as exc:
        raise DataError(f"chat template of {folder} does not compile: {str(exc).splitlines()[0]}") from None
    config = _tokenizer_config(folder)
    specials = {"bos_token": _special_text(config.get("bos_token")),
                "eos_token": _special_text(config.get("eos_token")) or (tokenizer.id_to_token(eos) or "")}

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=generation, **specials)
        except (jinja2.TemplateError, *_RENDER_ERRORS) as exc:
            raise TemplateFailure(str(exc)) from None

    def parts(messages: list[dict[str, str]]) -> list[Part]:
        out: list[Part] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prefix = render(messages[:i], True)
                full = render(messages[:i + 1], False)
                if not prefix.startswith(done) or not full.startswith(prefix):
                    raise TemplateFailure(f"turn {i} does not extend the rendering before it")
                out += [(prefix[len(done):], False, False), (full[len(prefix):], True, False)]
            else:
                full = render(messages[:i + 1], False)
                if not full.startswith(done):
                    raise TemplateFailure(f"turn {i} does not extend the rendering before it")
                out.append((full[len(done):], False, False))
            done = full
        return out

    return parts


def resolve_template(template: str, folder: Path, tokenizer: Tokenizer, eos: int
                     ) -> tuple[str, Renderer, str | None]:
    """(kind used, renderer, template sha256 or None) for ``template`` (auto, builtin or tokenizer) and the
    tokenizer folder ``folder``; ``tokenizer`` without a template there is a one-line DataError."""
    if template not in TEMPLATES:
        raise DataError(f"template ({template!r}) must be one of {', '.join(TEMPLATES)}")
    chat_template = read_chat_template(folder) if template != BUILTIN else None
    if chat_template is None:
        if template == TOKENIZER:
            raise DataError(f"template 'tokenizer' needs a chat_template in {folder / TOKENIZER_CONFIG_NAME} "
                            f"(or {folder / TEMPLATE_FILE}); use template 'builtin'")
        return BUILTIN, builtin_parts, None
    sha = hashlib.sha256(chat_template.encode()).hexdigest()
    return TOKENIZER, jinja_renderer(chat_template, folder, tokenizer, eos), sha
