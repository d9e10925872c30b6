"""ERNIE 4.5's chat format: a conversation -> token ids [S] and a loss mask [S] on the assistant turns.

The text is ERNIE 4.5's chat template (`ERNIE_CHAT_TEMPLATE`): the cls marker once, a system message as its
content + "\\n", user turns "User: " + content + "\\n", assistant turns "Assistant: " + content + the sep marker,
and "Assistant: " as the generation prompt. `render_text` gives that text; `render` its ids, where the markers
are the tokenizer's bos / eos ids (never text) and the mask is 1 on each assistant content and its closing eos
(the model learns to answer and to stop), 0 on everything else.

Segments: the text between two assistant contents and each assistant content are encoded separately and
concatenated, so a content's tokens never depend on its context. The space after "Assistant:" belongs to the
content: SentencePiece starts every segment with its word marker "▁", which stands for that space (the prompt's
trailing space is left to the first generated token). Decoding the ids between two bos / eos ids then gives
the template's text, for tokenizers that cover its characters and contents without leading, trailing or
repeated spaces (SentencePiece normalises those).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# verbatim: `chat_template` of baidu/ERNIE-4.5-0.3B-(Base-)PT's tokenizer_config.json, also transformers'
# models/ernie4_5/convert_ernie4_5_tokenizer.py DEFAULT_CHAT_TEMPLATE
ERNIE_CHAT_TEMPLATE = (
    '{%- if not add_generation_prompt is defined -%}\n    {%- set add_generation_prompt = true -%}\n{%- endif -%}\n'
    '{%- if not cls_token is defined -%}\n    {%- set cls_token = "<|begin_of_sentence|>" -%}\n{%- endif -%}\n'
    '{%- if not sep_token is defined -%}\n    {%- set sep_token = "<|end_of_sentence|>" -%}\n{%- endif -%}\n'
    '{{- cls_token -}}\n{%- for message in messages -%}\n    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\n" -}}\n    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\n" -}}\n    {%- endif -%}\n{%- endfor -%}\n'
    '{%- if add_generation_prompt -%}\n    {{- "Assistant: " -}}\n{%- endif -%}'
)
CLS, SEP = "<|begin_of_sentence|>", "<|end_of_sentence|>"
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation or preference pair that does not fit the chat format."""


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """ids int32 [S]; loss_mask int32 [S], 1 on the assistant contents and the eos closing each of them."""
    ids: np.ndarray
    loss_mask: np.ndarray


def _problem(messages, add_generation_prompt: bool) -> str | None:
    """What is wrong with `messages` ("turn t (role): what"), or None."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return f"a conversation is a non-empty list of messages, got {messages!r}"
    first = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for t, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"turn {t}: a message is a dict with 'role' and 'content', got {m!r}"
        role, content, where = m["role"], m["content"], f"turn {t} ({m['role']})"
        if role not in ROLES:
            return f"{where}: unknown role, expected one of {ROLES}"
        if not isinstance(content, str):
            return f"{where}: content must be a str, got {type(content).__name__}"
        if role == "system" and t != 0:
            return f"{where}: a system message may only be the first message"
        if role != "system" and role != ("user", "assistant")[(t - first) % 2]:
            return f"{where}: roles must alternate user / assistant, starting with user"
        if role == "assistant" and not content.strip():
            return f"{where}: empty assistant content"
    last, t = messages[-1]["role"], len(messages) - 1
    if add_generation_prompt and last != "user":
        return f"turn {t} ({last}): a prompt (add_generation_prompt) must end with a user turn"
    if not add_generation_prompt and last != "assistant":
        return f"turn {t} ({last}): a training conversation must end with an assistant turn"
    return None


def validate(messages, *, add_generation_prompt: bool = False, index: int | None = None) -> None:
    """Raises `ChatFormatError` unless `messages` is [system?] then user / assistant turns alternating from a user
    turn, ending with an assistant turn (training) or a user turn (`add_generation_prompt`: a prompt); contents
    are str, assistant contents not blank. `index` (the example's position in its set) goes in the message."""
    if (what := _problem(messages, add_generation_prompt)) is not None:
        raise ChatFormatError(f"chat example {index}: {what}" if index is not None else f"chat: {what}")


def _segments(messages, add_generation_prompt: bool) -> list[tuple[str, int]]:
    """(text, mask) segments whose concatenation is the template's text; CLS / SEP stand for the markers."""
    out, context = [(CLS, 0)], ""
    for m in messages:
        if m["role"] == "system":
            context += m["content"] + "\n"
        elif m["role"] == "user":
            context += "User: " + m["content"] + "\n"
        else:
            out += [(context + "Assistant:", 0), (" " + m["content"], 1), (SEP, 1)]
            context = ""
    if add_generation_prompt:
        context += "Assistant: "
    return out + [(context, 0)] if context else out


def render_text(messages, *, add_generation_prompt: bool = False) -> str:
    """The template's text of a (validated) conversation, markers as text."""
    validate(messages, add_generation_prompt=add_generation_prompt)
    return "".join(text for text, _ in _segments(messages, add_generation_prompt))


def render(messages, tokenizer, *, add_generation_prompt: bool = False, index: int | None = None) -> ChatTokens:
    """`messages` -> ids [S] and loss mask [S] (`tokenizer`: `encode(str)`, `bos_id`, `eos_id`)."""
    validate(messages, add_generation_prompt=add_generation_prompt, index=index)
    ids, mask = [], []
    for text, m in _segments(messages, add_generation_prompt):
        seg = [tokenizer.bos_id] if text == CLS else [tokenizer.eos_id] if text == SEP else \
            [int(i) for i in tokenizer.encode(text)]
        ids += seg
        mask += [m] * len(seg)
    return ChatTokens(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def prompt(messages, tokenizer, *, index: int | None = None) -> np.ndarray:
    """The ids [S] an engine continues to answer `messages` (ending with a user turn): the rendering with the
    generation prompt. They are a prefix of the rendering of the conversation with its answer."""
    return render(messages, tokenizer, add_generation_prompt=True, index=index).ids


def check_pair(pair, *, index: int | None = None) -> None:
    """A preference pair {"chosen": messages, "rejected": messages}: two training conversations with the same
    prompt (every message but the last) and different last assistant turns; `ChatFormatError` if not."""
    where = f"preference pair {index}" if index is not None else "preference pair"
    if not isinstance(pair, dict) or "chosen" not in pair or "rejected" not in pair:
        raise ChatFormatError(f"{where}: a dict with 'chosen' and 'rejected' conversations, got {pair!r}")
    for key in ("chosen", "rejected"):
        if (what := _problem(pair[key], False)) is not None:
            raise ChatFormatError(f"{where}: {key}: {what}")
    chosen, rejected = pair["chosen"], pair["rejected"]
    if list(chosen[:-1]) != list(rejected[:-1]):
        raise ChatFormatError(f"{where}: chosen and rejected have different prompts (the messages before the "
                              "last turn)")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise ChatFormatError(f"{where}: chosen and rejected give the same answer {chosen[-1]['content']!r}")
