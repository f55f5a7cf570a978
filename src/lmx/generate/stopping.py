"""Stop strings: release streamed text only once it can no longer become a stop string.

Searching every stop string in every piece of text made the cost of a token grow with the
number of stop strings (480,000 of them: 15 s for 16 tokens). Here the stop strings are kept
sorted, and the matcher walks the text one character at a time keeping the longest tail that
begins some stop string (Aho-Corasick's state, with the trie replaced by binary search over the
sorted strings, so nothing is built per character of the stop strings): a character costs a
few binary searches, however many stop strings there are.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable


class StopStringMatcher:
    """Feed text pieces; get back what is safe to emit and whether a stop string was hit.

    Text is held back only while its tail may still grow into one of the stop strings;
    the stop string itself, and anything after it, is never emitted. When several stop
    strings occur, the text is cut where the earliest one starts.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self._sorted = sorted(set(self.stops))
        groups: dict[int, set[str]] = {}
        for stop in self._sorted:
            groups.setdefault(len(stop), set()).add(stop)
        self._by_length = sorted(groups.items())  # (length, the stop strings of that length)
        self._held = ""
        self.stopped = False

    def _begins_a_stop(self, text: str) -> bool:
        """Whether ``text`` is a prefix of (or equal to) some stop string."""
        i = bisect_left(self._sorted, text)
        return i < len(self._sorted) and self._sorted[i].startswith(text)

    def _longest_stop_ending(self, text: str) -> int:
        """Length of the longest stop string that ``text`` ends with (0: none)."""
        best = 0
        for length, group in self._by_length:
            if length > len(text):
                break
            if text[len(text) - length :] in group:
                best = length
        return best

    def feed(self, text: str) -> str:
        """Add ``text``; return the part that is now final (possibly "")."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        # The longest tail of the text so far that begins a stop string. Any stop string that
        # ends at a position is a tail of it there; it grows by one character per step, so the
        # characters dropped from its front are paid for by the ones added (amortized O(1)).
        state = self._held
        start = len(buf)  # where the earliest stop string found so far begins
        for pos in range(len(self._held), len(buf)):
            state += buf[pos]
            while state and not self._begins_a_stop(state):
                state = state[1:]
            found = self._longest_stop_ending(state)
            if found:
                start = min(start, pos - found + 1)
            if start < len(buf) and pos - len(state) + 1 >= start:
                break  # no stop string still in progress began before the one found
        if start < len(buf):
            self.stopped = True
            self._held = ""
            return buf[:start]
        self._held = state  # a proper prefix of a stop string (a whole one would have matched)
        return buf[: len(buf) - len(state)]

    def flush(self) -> str:
        """Release whatever is held back (generation ended without completing a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
