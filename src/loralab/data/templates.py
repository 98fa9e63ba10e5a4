"""Prompt templates: how an (instruction, input) pair becomes the text the model reads.

``alpaca`` is the Stanford Alpaca layout the seeds fine-tune with (two variants: with and
without an input field); ``chat`` hands the turn to the tokenizer's own chat template;
``none`` uses the instruction (plus input) as the raw prompt.
"""

from __future__ import annotations

from typing import Literal

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

TemplateName = Literal["alpaca", "chat", "none"]


def format_prompt(instruction: str, input: str = "", *, template: TemplateName = "alpaca", tokenizer=None) -> str:
    """The prompt text for one example; the response follows it directly. Training, ``loralab
    generate`` and tasks scored by generation all show it; a chat template's text is tokenized
    without the tokenizer's special tokens (:func:`prompt_special_tokens`)."""
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        return tokenizer.apply_chat_template(chat_messages(instruction, input, tokenizer=tokenizer),
                                             tokenize=False, add_generation_prompt=True)
    if template == "none":
        return f"{instruction}\n{input}" if input else instruction
    raise ValueError(f"unknown template {template!r}")


def chat_messages(instruction: str, input: str = "", response: str | None = None, *, tokenizer) -> list[dict[str, str]]:
    """An instruction record as a conversation for the tokenizer's chat template: one user turn
    (the instruction, then the input after a blank line) and, given a response, the assistant's.
    DataError where the tokenizer has no chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        from loralab.errors import DataError

        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise DataError(f"the prompt template is 'chat' (data.template, or --template of eval and generate) but the "
                        f"tokenizer of {name} has no chat template (chat_template in tokenizer_config.json or "
                        "chat_template.jinja); use the template alpaca or none, or add a chat template to the "
                        "tokenizer")
    turns = [{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}]
    return turns if response is None else [*turns, {"role": "assistant", "content": response}]


def chat_turn_end(tokenizer) -> str | None:
    """What the tokenizer's chat template writes after an assistant's words (ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``, a plain template's newline): where a generated
    answer ends, as training on chat data taught it. None where the template writes nothing."""
    words = "loralab-answer"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": words}],
                                         tokenize=False)
    after = text.split(words, 1)[1] if words in text else ""
    return after.strip() or after[:1] or None


def prompt_special_tokens(template: TemplateName) -> bool:
    """Whether a prompt in ``template`` is tokenized with the tokenizer's special tokens (a BOS
    where it adds one), as training tokenizes it: yes for alpaca and none; no for the chat
    template, whose rendering is the whole of what the model reads (transformers'
    ``apply_chat_template(tokenize=True)``)."""
    return template != "chat"
