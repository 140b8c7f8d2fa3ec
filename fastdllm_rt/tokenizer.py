"""The checkpoint's tokenizer, read with the ``tokenizers`` library from the checkpoint folder.

Reading ``tokenizer.json`` + ``tokenizer_config.json`` directly (rather than through transformers) makes the
result the same under transformers 4.x and 5.x and keeps transformers out of the runtime's imports. Chat
templates are rendered with Jinja in a sandbox, as transformers does.
"""
from __future__ import annotations

import json
import os

from .errors import ConfigError


class Tokenizer:
    def __init__(self, folder: str):
        from tokenizers import Tokenizer as _HFTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no tokenizer.json in {folder}; ship the tokenizer files beside config.json")
        self.folder = folder
        self._tok = _HFTokenizer.from_file(path)
        self._tok.no_padding()
        self._tok.no_truncation()
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        self.config = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.chat_template = self.config.get("chat_template")
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if self.chat_template is None and os.path.isfile(jinja_path):
            self.chat_template = open(jinja_path).read()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (the original eval adds none either)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ConfigError(f"the tokenizer in {self.folder} has no chat template; drop --apply_chat_template "
                              f"or add chat_template to tokenizer_config.json")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=self.eos_token, bos_token=self.bos_token, pad_token=self.pad_token)


def load_tokenizer(folder: str) -> Tokenizer | None:
    """The folder's tokenizer, or None when it ships none (the tiny oracle checkpoint has only ids)."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    return Tokenizer(folder)


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message):
    raise ConfigError(f"chat template error: {message}")
