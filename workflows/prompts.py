"""Prompts of the built-in domain: Fashion-MNIST class names in several phrasings.

Training phrasings teach the teacher; the held-out paraphrases are used only by the evaluator's
prompt-adherence metric (CLIPScore analogue), so adherence is measured on wording the model never saw.
"""

from __future__ import annotations

import re

CLASS_NAMES = [
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]

TRAIN_TEMPLATES = [
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a {}",
    "a grayscale photo of a {}",
    "a product photo of a {}",
]

HELDOUT_TEMPLATES = [
    "a close-up photograph showing a {}",
    "a small low-resolution image of one {}",
    "black and white catalogue shot: {}",
    "this is a {} on a dark background",
]


def _article(text: str) -> str:
    """'a ankle boot' -> 'an ankle boot'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def prompt(template: str, label: int) -> str:
    return _article(template.format(CLASS_NAMES[label]))


def prompt_table(templates: list[str]) -> list[tuple[str, int]]:
    """All (prompt, label) pairs for the templates, label-major."""
    return [(prompt(t, c), c) for c in range(len(CLASS_NAMES)) for t in templates]


def train_prompts() -> list[tuple[str, int]]:
    return prompt_table(TRAIN_TEMPLATES)


def heldout_prompts() -> list[tuple[str, int]]:
    return prompt_table(HELDOUT_TEMPLATES)
