from __future__ import annotations

from palate.data import Message
from palate.formatting import prompt_ids, render_prompt, response_ids


def test_chat_template_ends_at_assistant_turn(tiny) -> None:
    _, tok = tiny
    text = render_prompt(tok, [Message(role="user", content="Hi")])
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert render_prompt(tok, "Hi") == text  # a string is one user turn


def test_response_ends_with_eos_and_concatenates(tiny) -> None:
    _, tok = tiny
    p, r = prompt_ids(tok, "Hi"), response_ids(tok, "Hello there")
    assert r[-1] == tok.eos_token_id
    assert tok.decode(p + r) == render_prompt(tok, "Hi") + "Hello there<|im_end|>"


def test_plain_template_without_chat_template(tiny) -> None:
    _, base = tiny
    tok = type(base).from_pretrained(base.name_or_path) if base.name_or_path else base
    tok.chat_template = None
    msgs = [Message(role="system", content="Be brief."), Message(role="user", content="Hi")]
    assert render_prompt(tok, msgs) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
