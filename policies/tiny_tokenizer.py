"""The `tiny` size's text tokenizer, built by the project (no download): byte-level BPE.

Trained on a small built-in corpus of robot instructions, then padded with reserved tokens to a
fixed vocabulary of 1024 ids. At least the last 256 ids are reserved tokens that no text encodes
to, so the action tokens that overwrite them never collide with the prompt.
"""
from __future__ import annotations

import functools
import json

TINY_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

_COLOURS = "red green blue yellow orange purple white black grey pink cyan brown".split()
_OBJECTS = ("cube", "ball", "block", "bowl", "plate", "mug", "cup", "drawer", "button", "tray", "circle", "box",
            "bottle", "can", "lid", "door", "handle", "sponge", "towel", "spoon", "fork", "apple", "banana")
_PHRASES = ("pick up the {c} {o}", "push the {c} {o} onto the {c2} circle", "put the {c} {o} in the {c2} tray",
            "stack the {c} {o} on the {c2} {o2}", "reach the {c} {o}", "press the {c} button", "open the drawer",
            "close the drawer", "move the {c} {o} to the left of the {c2} {o2}", "place the {o} on the {o2}",
            "put the {c} cube in the {c} tray and the {c2} cube in the {c2} tray",
            "press the {c} button, then put the {c2} cube in the tray", "turn on the stove", "wipe the table")
PROMPTS = ("In: What action should the robot take to {instruction}?\nOut:",
           "Q: What action should the robot take to {instruction}? A:")


def corpus() -> list[str]:
    lines = []
    for i, phrase in enumerate(_PHRASES):
        for j, colour in enumerate(_COLOURS):
            text = phrase.format(c=colour, c2=_COLOURS[(j + 3) % len(_COLOURS)], o=_OBJECTS[(i + j) % len(_OBJECTS)],
                                 o2=_OBJECTS[(i + 2 * j + 1) % len(_OBJECTS)])
            lines.extend(p.format(instruction=text) for p in PROMPTS)
    return lines


@functools.lru_cache(maxsize=4)
def _trained_spec(vocab_size: int, trained_size: int) -> str:
    """The tokenizers JSON of the trained and padded BPE (trained once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if trained_size + 256 > vocab_size:
        raise ValueError(f"trained_size {trained_size} leaves fewer than 256 reserved ids in {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=trained_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    # Fill the vocabulary up to a fixed size with reserved tokens no merge produces.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(vocab_size - len(vocab)):
        vocab[f"<reserved_{i}>"] = len(vocab)
    return json.dumps(spec)


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, trained_size: int = 640):
    """A transformers fast tokenizer (BOS <s>, EOS </s>, PAD <pad>) with `vocab_size` ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_trained_spec(vocab_size, trained_size))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    if fast.vocab_size != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {fast.vocab_size} ids, expected {vocab_size}")
    return fast
