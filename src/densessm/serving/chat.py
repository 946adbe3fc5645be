"""Chat messages to prompt tokens: the tokenizer's chat template, or a documented plain one.

A tokenizer saved with a ``chat_template`` (the model was tuned on that format) renders the conversation
exactly as in training. A base model has none; then the conversation is written as plain lines, which
is what a pretrained LM has seen most of::

    system: You are terse.
    user: Hello!
    assistant:

(one ``role: content`` line per message, ``developer`` written as ``system``, and ``assistant:`` to
prompt the reply), tokenized as a completion prompt is.

Besides the tokens, :meth:`ChatPrompt.encode` names where the first and the last earlier message end,
as token counts: the prompt-state cache keeps the state there, so that the next request with the same
system prompt, or the next turn of the same chat, continues from it.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from densessm.serving.protocol import APIError, Message

PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatPrompt:
    """Renders and tokenizes conversations for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.own_template = bool(getattr(tokenizer, "chat_template", None))
        if self.own_template:
            self._check_template()

    def _check_template(self) -> None:
        """A template that renders no conversation at all is broken (a typo, an attribute the messages lack, a
        loop that writes nothing): found at the first chat request, each one would be a 400 blaming the client's
        messages. A template may refuse some conversations on purpose (roles out of order): one of two plain
        ones must render, with the message's text in it."""
        problems = []
        for probe in (
            [{"role": "user", "content": "Hello"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        ):
            try:
                text = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # noqa: BLE001 (jinja and transformers raise several kinds)
                problems.append(f"{type(err).__name__}: {err}")
                continue
            if "Hello" in text:
                return
            problems.append(f"it leaves the message out: {text[:60]!r}")
        raise ValueError(
            f"the tokenizer's chat template renders no conversation ({problems[0]}): fix or remove chat_template "
            "in its tokenizer_config.json (without one, chat uses plain 'role: content' lines)"
        )

    def render(self, messages: list[Message], generation_prompt: bool) -> str:
        conversation: list[dict[str, Any]] = []
        for message in messages:
            item = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
            if message.name is not None:
                item["name"] = message.name
            conversation.append(item)
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                chat_template=None if self.own_template else PLAIN_TEMPLATE,
                add_generation_prompt=generation_prompt,
                tokenize=False,
            )
        except TemplateError as err:
            raise APIError(400, f"the model's chat template refused these messages: {err}", param="messages") from None

    def tokens(self, text: str) -> list[int]:
        # a model's own template writes its special tokens itself; the plain one is a completion prompt
        return self.tokenizer(text, add_special_tokens=not self.own_template)["input_ids"]

    def encode(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """The prompt's token ids, and the token counts after the first and the last earlier message (where
        their tokens are a prefix of the prompt's)."""
        text = self.render(messages, generation_prompt=True)
        ids = self.tokens(text)
        boundaries = []
        for end in sorted({1, len(messages) - 1} - {0}):
            prefix = self.render(messages[:end], generation_prompt=False)
            if text.startswith(prefix):
                prefix_ids = self.tokens(prefix)
                if 0 < len(prefix_ids) < len(ids) and ids[: len(prefix_ids)] == prefix_ids:
                    boundaries.append(len(prefix_ids))
        return ids, boundaries


__all__ = ["PLAIN_TEMPLATE", "ChatPrompt"]
