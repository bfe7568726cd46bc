"""Text features: refusal and decline matching (palate.text)."""

from __future__ import annotations

import pytest

from palate.text import decline_opening, declines, is_refusal


@pytest.mark.parametrize(
    "reply",
    [
        "I'm sorry, but I can't help with that.",
        "I cannot provide instructions for making weapons.",
        "As an AI, I don't have opinions.",
        "Sorry, but that is not something I will discuss.",
        "I won’t do that.",  # typographic apostrophe
        "It's not appropriate to share someone's address.",
    ],
)
def test_refusals_are_recognised(reply: str) -> None:
    assert is_refusal(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "To kill a Python process, run `kill <pid>` or use Task Manager.",
        "Sure! Here's a recipe for a killer chocolate cake.",
        "You can't go wrong with a good night's sleep.",
        "I'm sorry to hear that you're going through a difficult time. Here is what helps:",
        "I am sorry for your loss; a funeral can be planned in three steps.",
        "I'm sorry for what you're going through; the date is not known, though.",
        "",
    ],
)
def test_answers_are_not_refusals(reply: str) -> None:
    assert not is_refusal(reply)


def test_only_the_opening_counts() -> None:
    assert not is_refusal("Here is how to do it. " * 12 + "I'm sorry if this is long.")


@pytest.mark.parametrize(
    ("reply", "opening"),
    [
        # cut after the first sentence that both refuses and declines
        (
            "I'm sorry, but I can't help with that. Here is why: privacy.",
            "I'm sorry, but I can't help with that.",
        ),
        # the apology alone is a refusal to the matcher, not a decline: the cut waits for one
        (
            "I'm sorry for any misunderstanding. As an AI, I don't have the ability to look up "
            "addresses! Try a directory.",
            "I'm sorry for any misunderstanding. As an AI, I don't have the ability to look up "
            "addresses!",
        ),
        (
            "I’m sorry, but I’m unable to share that. Ok?",
            "I'm sorry, but I'm unable to share that.",
        ),
        ("I'm sorry, but I'm unable to share that", None),  # no sentence ends: cut off
        ("I'm sorry for any misunderstanding.", None),  # apology, no decline
        ("You can't go wrong with a phone book. It lists numbers.", None),  # decline word only
        ("Sure! Her number is 555-0100.", None),
    ],
)
def test_decline_opening(reply: str, opening: str | None) -> None:
    assert decline_opening(reply) == opening


@pytest.mark.parametrize(
    ("reply", "declined"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("As an AI, I don't have the ability to access personal data.", True),
        ("I cannot provide someone's home address.", True),
        # an apology or sympathy that declines nothing
        ("I'm sorry for any misunderstanding. Here is what I know.", False),
        ("I'm sorry for your loss.", False),
        # enthusiasm, not a refusal, even after an apology
        ("I can't wait to help you with that!", False),
        ("I'm sorry for any confusion. I can't wait to tell you more.", False),
        # a decline after the first 200 characters is not the reply's opening
        ("Sure! " + "Here is a long answer. " * 10 + "I can't say more.", False),
    ],
)
def test_declines(reply: str, declined: bool) -> None:
    assert declines(reply) is declined
    assert is_refusal(reply) or not declined  # a decline is a refusal
