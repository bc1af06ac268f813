"""Usernames that cannot pass for someone else's.

Two checks at sign-up, after Django's own (NFKC normalisation, the allowed
characters, no case-insensitive duplicate):

- **one script**: a name may mix letters of different scripts only in the
  combinations Unicode's "highly restrictive" profile allows (UTS #39, 5.2:
  Latin with Han, Hiragana and Katakana; with Han and Bopomofo; with Han and
  Hangul). `аlice` (Cyrillic а, Latin lice) is refused. Digits and `_.@+-` belong
  to every script.
- **no disguise**: a name with no Latin letters whose skeleton is all ASCII
  (`аӏісе` in Cyrillic, which reads as Latin) is a whole-script confusable: refused.
- **one skeleton**: no two accounts share a skeleton, the form a name takes once
  every character is replaced by the one it can be mistaken for (UTS #39's
  skeleton, with the confusables data of Unicode's confusables.txt as shipped by
  confusable-homoglyphs), marks removed and case folded. `аӏісе` in Cyrillic, `ａｌｉｃｅ`,
  `aIice` and `a1ice` all have alice's skeleton and are refused while alice exists.

The skeletons live in Account.name_skeleton (unique), so the check is one indexed
lookup and two concurrent sign-ups of look-alikes cannot both win.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

# confusable_homoglyphs is imported where it is used: its tables take 6.6 MB of a
# process, which a worker that serves sockets (and no sign-up) need not hold.

# UTS #39 5.2, "highly restrictive": the script sets one identifier may mix.
ALLOWED_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
NEUTRAL = frozenset({"COMMON", "INHERITED"})

# Look-alikes within ASCII itself (confusables.txt's prototypes for them), applied
# before case folding, which would otherwise make "I" an "i" and hide it.
ASCII_PROTOTYPES = {"I": "l", "1": "l", "|": "l", "0": "o", "O": "o"}
# Pairs of letters that read as one.
PAIRS = (("rn", "m"), ("vv", "w"), ("cl", "d"))


@lru_cache(maxsize=None)
def _prototype(char: str) -> str:
    """The ASCII letter or digit `char` is most easily taken for, or `char` itself."""
    if char.isascii():
        return ASCII_PROTOTYPES.get(char, char)
    from confusable_homoglyphs import confusables

    for glyph in confusables.confusables_data.get(char, ()):
        target = glyph["c"]
        if len(target) == 1 and target.isascii() and target.isalnum():
            return ASCII_PROTOTYPES.get(target, target)
    return char


def skeleton(name: str) -> str:
    """What `name` looks like, reduced: equal skeletons mean names a reader can confuse."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(_prototype(char) for char in text)
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    text = text.casefold()
    for pair, single in PAIRS:
        text = text.replace(pair, single)
    return "".join(ASCII_PROTOTYPES.get(c, c) for c in text)


def scripts(name: str) -> set[str]:
    from confusable_homoglyphs import categories

    return {categories.alias(char) for char in unicodedata.normalize("NFKC", name)} - NEUTRAL


def mixes_scripts(name: str) -> bool:
    """True when the name's letters come from scripts that may not be mixed."""
    found = scripts(name)
    return len(found) > 1 and not any(found <= allowed for allowed in ALLOWED_MIXES)


def disguised_as_latin(name: str) -> bool:
    """A whole-script confusable: no Latin letter, yet it reads as ASCII throughout."""
    found = scripts(name)
    if not found or "LATIN" in found:
        return False
    shape = skeleton(name)
    return shape.isascii() and any(c.isalpha() for c in shape)
