"""Chat records: conversations rendered with the tokenizer's chat template, the loss on the
assistant's turns only.

    messages = conversation(record, "data.jsonl:3", columns={})
    ids, mask = assistant_tokens(messages, tokenizer, where="data.jsonl:3")  # mask 1 = assistant

Two record layouts are read: ``{"messages": [{"role": ..., "content": ...}, ...]}`` and the
ShareGPT layout ``{"conversations": [{"from": "human", "value": ...}, ...]}`` (human -> user,
gpt -> assistant, system -> system).

Which tokens are the assistant's:

* a template with a ``{% generation %}`` block marks them itself: transformers renders it with
  ``return_assistant_tokens_mask=True`` and every token overlapping a marked span carries loss;
* any other template is rendered on prefixes of the conversation: the assistant's turn ``i``
  runs from the end of "messages before ``i`` plus the generation prompt" to the end of
  "messages up to ``i``" (trailing whitespace after the turn's end token excluded). Both must
  be prefixes of the rendering of the whole conversation (a template that renders earlier turns
  differently once later turns follow breaks this, and is refused with the record named). The
  spans are found on the rendered text and mapped to tokens through the tokenizer's offsets,
  so a BPE merge across a turn boundary cannot shift them.
"""

from __future__ import annotations

import re

from loralab.errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
# The roles of the messages layout that chat templates render (OpenAI's and transformers' names);
# the loss is on the assistant's turns only.
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def conversation(rec: dict, where: str, columns: dict[str, str], *, empty_ok: bool = False) -> list[dict[str, str]]:
    """The record's turns as [{"role", "content"}], checked; ShareGPT turns mapped to roles. An
    empty assistant turn is an error unless ``empty_ok`` (data.min_response_chars set: its filter
    drops conversations with too little to learn)."""
    key_messages, key_conv = columns.get("messages", "messages"), columns.get("conversations", "conversations")
    if key_messages in rec:
        turns, sharegpt, key = rec[key_messages], False, key_messages
    elif key_conv in rec:
        turns, sharegpt, key = rec[key_conv], True, key_conv
    else:
        raise DataError(
            f"{where}: missing field {key_messages} (or {key_conv}) (format messages needs a list of turns)")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key} must be a non-empty list of turns")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out = []
    for n, turn in enumerate(turns):
        if (not isinstance(turn, dict) or not isinstance(turn.get(role_key), str)
                or not isinstance(turn.get(content_key), str)):
            raise DataError(f"{where}: {key}[{n}] must be an object with string fields {role_key} and {content_key}")
        role = turn[role_key]
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise DataError(f"{where}: {key}[{n}].from is {role!r}; known: {', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        elif role not in MESSAGE_ROLES:  # a misspelt role would render, and its turn be learned or not, silently
            hint = f" (did you mean {role.strip().lower()!r}?)" if role.strip().lower() in MESSAGE_ROLES else ""
            raise DataError(f"{where}: {key}[{n}].role is {role!r}{hint}; known: {', '.join(MESSAGE_ROLES)}")
        text = turn[content_key]
        if role == "assistant" and not text.strip() and not empty_ok:  # it would teach an answer of nothing
            raise DataError(f"{where}: {key}[{n}] is an assistant turn whose {content_key} is "
                            f"{'empty' if not text else 'only spaces'}; an assistant turn needs a response "
                            "to train on (a tool call in another field is not rendered; data.min_response_chars: 1 "
                            "drops conversations with no assistant text instead)")
        out.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    if out[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation opens with an assistant turn; the first turn must be "
                        "system or user (a template renders the assistant after a prompt)")
    return out


def check_chat_template(tokenizer) -> None:
    """A clear error for a tokenizer that cannot render conversations."""
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"data.format messages: the tokenizer of {name} has no chat template (chat_template in "
            "tokenizer_config.json or chat_template.jinja), so conversations cannot be rendered; add one "
            "(tokenizer.chat_template = ...; tokenizer.save_pretrained(DIR)) or use instruction data"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"data.format messages needs a fast tokenizer (tokenizer.json) for {name}: the assistant "
                        "turns are located through token offsets")


def assistant_tokens(messages: list[dict[str, str]], tokenizer, *, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of one whole conversation, not truncated; mask is 1 on the assistant's tokens."""
    template = tokenizer.chat_template
    try:
        if isinstance(template, str) and GENERATION_BLOCK.search(template):
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True, tokenizer_kwargs={"verbose": False})
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            if not any(mask):
                raise DataError(f"{where}: the chat template has a generation block, but it marked none of "
                                "this conversation's assistant turns")
        else:
            ids, mask = _prefix_mask(messages, tokenizer, where)
    except DataError:
        raise
    except Exception as exc:  # jinja's TemplateError, raise_exception(...) in the template
        raise DataError(f"{where}: the chat template cannot render this conversation "
                        f"({type(exc).__name__}: {exc})") from None
    return ids, mask


def _prefix_mask(messages: list[dict[str, str]], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Tokens and assistant mask from renderings of the conversation's prefixes."""

    def render(msgs: list[dict[str, str]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        for part, what in ((before, f"the first {i} turns plus the generation prompt"),
                           (through, f"the first {i + 1} turns")):
            if not full.startswith(part):
                at = next((k for k, (a, b) in enumerate(zip(part, full, strict=False)) if a != b), len(full))
                raise DataError(
                    f"{where}: the chat template renders {what} differently from the start of the whole "
                    f"{len(messages)}-turn conversation (from character {at}: {part[at:at + 40]!r} "
                    f"vs {full[at:at + 40]!r}), "
                    "so the assistant turns cannot be located by rendering prefixes. Use a template with a "
                    "{% generation %} block around the assistant's content (transformers then marks the tokens)"
                )
        start, end = len(before), len(through.rstrip())
        if end > start:
            spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    mask, k = [], 0
    for t_start, t_end in enc["offset_mapping"]:
        while k < len(spans) and t_start >= spans[k][1]:
            k += 1
        mask.append(int(k < len(spans) and t_end > spans[k][0]))
    return list(enc["input_ids"]), mask
