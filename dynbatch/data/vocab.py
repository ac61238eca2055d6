"""Token vocabularies shared by the SST and Python-AST readers.

`Vocab` maps tokens to dense integer ids. Id 0 is the unknown token; the other ids follow
count (descending), then the token itself, so one corpus always yields the same ids on every
machine and Python hash seed. Pure Python: imports neither torch nor the rest of dynbatch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence


class Vocab:
    """An immutable token -> id table.

    Invariants: ``words[0] == Vocab.UNK``; ``words`` has no duplicates; ``vocab[w]`` is the
    index of ``w`` in ``words``, or ``Vocab.UNK_ID`` (0) for a token not in the table.

    >>> v = Vocab.build([["a", "b", "a"], ["c", "a"]])
    >>> v.words, v["a"], v["zzz"], len(v)
    (('<unk>', 'a', 'b', 'c'), 1, 0, 4)
    """

    UNK = "<unk>"
    UNK_ID = 0

    __slots__ = ("_words", "_ids")

    def __init__(self, words: Sequence[str]) -> None:
        words = tuple(words)
        if not words or words[0] != self.UNK:
            raise ValueError(f"a Vocab's first word must be {self.UNK!r}")
        ids = {w: i for i, w in enumerate(words)}
        if len(ids) != len(words):
            raise ValueError("a Vocab's words must be unique")
        self._words = words
        self._ids = ids

    @classmethod
    def build(cls, token_seqs: Iterable[Iterable[str]], min_count: int = 1) -> Vocab:
        """Count the tokens of every sequence; keep those seen at least ``min_count`` times."""
        counts: Counter[str] = Counter()
        for seq in token_seqs:
            # A bare str is an iterable of characters: almost surely a caller who passed
            # one flat token list instead of a list of sequences.
            if isinstance(seq, str):
                raise TypeError("Vocab.build takes sequences of tokens, got a str")
            counts.update(seq)
        # The UNK spelling in the data would collide with id 0; it maps there anyway.
        counts.pop(cls.UNK, None)
        kept = sorted((w for w, c in counts.items() if c >= min_count),
                      key=lambda w: (-counts[w], w))
        return cls([cls.UNK, *kept])

    @property
    def words(self) -> tuple[str, ...]:
        """Tokens in id order; ``words[i]`` is the token with id ``i``."""
        return self._words

    def __getitem__(self, token: str) -> int:
        return self._ids.get(token, self.UNK_ID)

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``, unknown ones as ``UNK_ID``."""
        get = self._ids.get
        return [get(t, self.UNK_ID) for t in tokens]

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __len__(self) -> int:
        return len(self._words)

    def __iter__(self) -> Iterator[str]:
        return iter(self._words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._words == other._words

    def __hash__(self) -> int:
        return hash(self._words)

    def __repr__(self) -> str:
        head = ", ".join(repr(w) for w in self._words[:6])
        more = ", ..." if len(self._words) > 6 else ""
        return f"Vocab({len(self._words)} words: {head}{more})"
