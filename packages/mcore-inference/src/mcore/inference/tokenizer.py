"""Text in and out of the engine: tokenizers, chat templates and incremental detokenization.

:class:`TextTokenizer` is what the engine and the server need. :class:`HFTextTokenizer` reads a
Hugging Face model directory (``tokenizer.json`` through the ``tokenizers`` library, special
tokens, end-of-sequence ids and the chat template from ``tokenizer_config.json``,
``chat_template.jinja`` and ``generation_config.json``); :class:`CoreTextTokenizer` adapts the
tokenizers of mcore training runs (``byte``, ``hf``).

Chat templates are rendered with jinja2 in a sandbox, with the helpers HF templates expect
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text). A tokenizer
without a template uses :data:`FALLBACK_CHAT_TEMPLATE`: one ``Role: content`` line per message
and a final ``Assistant:`` to answer after.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mcore.inference.errors import InvalidRequestError

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""The chat template of tokenizers that carry none."""


@runtime_checkable
class TextTokenizer(Protocol):
    """What the engine and the server need from a tokenizer."""

    vocab_size: int
    eos_token_ids: frozenset[int]
    """Ids that end a generation unless a request sets ``ignore_eos``."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer adds to a
        prompt (e.g. BOS)."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of a conversation."""
        ...


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc}") from exc


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages as ``[{"role": str, "content": str}, ...]``; text parts are joined."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", field="messages")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a string", field="messages")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise InvalidRequestError(
                        f"messages[{i}].content: only text parts are supported", field="messages"
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of text parts",
                field="messages",
            )
        out.append({**message, "role": role, "content": content})
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a (Hugging Face style) jinja chat template over ``messages``."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"chat template: {message}", field="messages")

    def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
        )
    except InvalidRequestError:
        raise
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"chat template failed: {exc}", field="messages") from exc


class HFTextTokenizer:
    """A Hugging Face tokenizer directory, read with the ``tokenizers`` library."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise InvalidRequestError(f"{str(self.path)!r} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        config = _read_json(self.path / "tokenizer_config.json")
        added = self._tok.get_added_tokens_decoder()
        self.vocab_size = max(
            self._tok.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1
        )
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        eos = _ids(_read_json(self.path / "generation_config.json").get("eos_token_id"))
        if not eos:
            eos = _ids(_read_json(self.path / "config.json").get("eos_token_id"))
        eos_id = None if self.eos_token is None else self._tok.token_to_id(self.eos_token)
        if eos_id is not None:
            eos.add(eos_id)
        self.eos_token_ids = frozenset(eos)
        self.chat_template = self._chat_template(config)

    def _chat_template(self, config: dict[str, Any]) -> str | None:
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a long prompt
        # encoded on a worker thread then leaves the server's event loop running.
        (encoding,) = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)
        return encoding.ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """How one token reads in logprobs: its text, or its vocabulary entry when alone it is
        no whole character (a byte of a multi-byte one), so every id has its own key."""
        text = self._tok.decode([int(token_id)], skip_special_tokens=False)
        if not text or "\ufffd" in text:
            return self._tok.id_to_token(int(token_id)) or f"<{token_id}>"
        return text

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        return render_chat_template(
            self.chat_template or FALLBACK_CHAT_TEMPLATE,
            check_messages(list(messages)),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    @property
    def chat_template_adds_bos(self) -> bool:
        """Whether the rendered chat prompt already holds the special tokens (HF encodes
        templated prompts without adding them again)."""
        return self.chat_template is not None

    def __repr__(self) -> str:
        return f"HFTextTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class CoreTextTokenizer:
    """An mcore training tokenizer (``mcore.core.data.tokenizer``) as a :class:`TextTokenizer`:
    its end-of-document id ends generations, and chats use the fallback template."""

    chat_template_adds_bos = False

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eos_token_ids = frozenset({tokenizer.eod})

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        text = self._tok.decode([int(token_id)])
        return text if text and "\ufffd" not in text else f"<{token_id}>"

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        return render_chat_template(
            FALLBACK_CHAT_TEMPLATE,
            check_messages(list(messages)),
            add_generation_prompt=add_generation_prompt,
        )

    def __repr__(self) -> str:
        return f"CoreTextTokenizer({self._tok!r})"


def encode_chat(tokenizer: TextTokenizer, messages: Any) -> list[int]:
    """Token ids of a chat prompt (template rendered, then encoded as HF does)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    adds = getattr(tokenizer, "chat_template_adds_bos", False)
    return tokenizer.encode(text, add_special_tokens=not adds)


class IncrementalDetokenizer:
    """A request's generated text, decoded token by token, and its stop strings, at a cost per
    token that does not grow with the text.

    Each token decodes a short window, the tokens that last became text (for context: spaces
    that depend on the previous token) followed by those not yet text, and keeps only the new
    characters: the same text as decoding everything. A token that decodes to an incomplete
    character (a multi-byte one split over tokens) waits for the next, at most ``MAX_PENDING``
    of them; one that adds nothing (a skipped special token) is left out of the window.

    The text leaves in pieces (:meth:`take`) once no stop string can begin in it: the last
    ``len(longest stop string) - 1`` characters are held back until the next token, or the end.
    """

    CONTEXT = 6
    """Prompt tokens decoded along with the first generated ones, for their spacing."""
    MAX_PENDING = 8
    """Tokens waiting to complete a character at most; then they go out as they decode."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        prompt_token_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._window = list(prompt_token_ids[-self.CONTEXT :])
        self._read = len(self._window)
        """Tokens of the window already text (the context); those after it are pending."""
        self._held = ""
        """Text decoded but not released: it might begin a stop string."""
        self._released: list[str] = []
        self.stopped_by: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self) -> str:
        before = self._decode(self._window[: self._read])
        after = self._decode(self._window)
        return after[len(before) :] if len(after) > len(before) else ""

    def add(self, token: int, *, special: bool = False) -> str | None:
        """Take one generated token; returns the stop string it completed, if any. ``special``
        tokens (the ones that stop the request) are left out of the text."""
        if self.stopped_by is not None or special:
            return None
        self._window.append(token)
        new = self._new_text()
        pending = len(self._window) - self._read
        if not new and pending == 1:
            self._window.pop()  # it adds nothing, and nothing waits for it
            return None
        if (not new or new.endswith("\ufffd")) and pending < self.MAX_PENDING:
            return None
        # These tokens are text now, and the context of the next ones.
        del self._window[: self._read]
        self._read = len(self._window)
        return self._release(new)

    def _release(self, new: str) -> str | None:
        # The held text was searched already, but a stop string may begin in it.
        text = self._held + new
        found = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        if found:
            index, string = min(found)
            self._released.append(text[:index])
            self._held, self.stopped_by = "", string
            return string
        keep = min(self._hold, len(text))
        self._released.append(text[: len(text) - keep])
        self._held = text[len(text) - keep :]
        return None

    def take(self, *, final: bool = False) -> str:
        """The text released since the last call. ``final`` (the request is over) releases
        the rest too: the held-back characters and any incomplete one."""
        if final and self.stopped_by is None:
            self._released.append(self._held + self._new_text())
            self._held = ""
            del self._window[: self._read]
            self._read = len(self._window)
        text = "".join(self._released)
        self._released.clear()
        return text
