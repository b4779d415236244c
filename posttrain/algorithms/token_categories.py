"""Token categories (MOPD's c_i,t, docs/algorithms.md §2.4) and the loop point τ_i of a response (§2.5).

Both are tokenizer-agnostic: they take a response's token ids and/or its tokens decoded one by one
(`token_strings_from_ids` builds those from any `decode` callable or vocabulary list).

Categories. The response text is the concatenation of its token strings; spans are found in the text with
the chat / think / tool-call structure and a few perception patterns, each character gets a category, and
a token takes the highest-priority category among its characters:

    FORMAT      chat and tool-call syntax, special tokens (<|im_end|>, <think>, <tool_call>,
                the tool-call JSON keys "name" / "arguments")
    PERCEPTION  timestamps (12.5s, 01:02), boxes ([x1, y1, x2, y2], (x1,y1),(x2,y2), <|box_start|>…<|box_end|>),
                quoted strings ("…", “…”: OCR readouts)
    TOOL_ARGS   inside <tool_call>…</tool_call>
    REASONING   inside <think>…</think> (also before a lone </think>: Qwen3-style templates open <think> in the prompt)
    ANSWER      everything else (after </think>, or the whole response when there is no think span)

Priority: FORMAT > PERCEPTION > TOOL_ARGS > REASONING > ANSWER (perception is not looked for inside tool
calls: a box inside tool arguments is a tool argument). The patterns are heuristics: they are meant to
down-weight template tokens and up-weight perception and reasoning, not to parse.

Loop point. τ_i is the first position where the response starts looping: the earliest start of an n-gram
(n in [min_ngram, max_ngram]) repeated back to back at least `min_repeats` times and covering at least
`min_loop_tokens` tokens. When there is no loop, τ_i = len(response), so that "t ≥ τ_i" is false for every
response token (mopd_loss also accepts −1 as "no loop").
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class TokenCategory(IntEnum):
    FORMAT = 0
    REASONING = 1
    ANSWER = 2
    PERCEPTION = 3
    TOOL_ARGS = 4


# Higher wins when a token's characters fall in several categories.
_PRIORITY = {TokenCategory.ANSWER: 0, TokenCategory.REASONING: 1, TokenCategory.TOOL_ARGS: 2,
             TokenCategory.PERCEPTION: 3, TokenCategory.FORMAT: 4}

DEFAULT_CATEGORY_WEIGHTS: dict[TokenCategory, float] = {category: 1.0 for category in TokenCategory}


@dataclass(frozen=True)
class ChatMarkers:
    """The structural strings of the chat template (Qwen-style defaults)."""
    think_open: str = "<think>"
    think_close: str = "</think>"
    tool_open: str = "<tool_call>"
    tool_close: str = "</tool_call>"
    # Other literal tags that are pure format (their content is not affected).
    extra_format_tags: tuple[str, ...] = ("<answer>", "</answer>", "<tool_response>", "</tool_response>")
    # Special tokens written as <|name|>, plus a role name right after <|im_start|>.
    special_token_regex: str = r"<\|im_start\|>[a-z_]*\n?|<\|[A-Za-z0-9_\-]{1,40}\|>"
    box_open: str = "<|box_start|>"
    box_close: str = "<|box_end|>"


_NUMBER = r"-?\d+(?:\.\d+)?"
_PERCEPTION_PATTERNS = [
    re.compile(r"(?<![\w.:])\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?(?![\w:])"),                      # 01:02, 1:02:03.5
    re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:s|sec|secs|seconds)\b"),                       # 12.5s, 3 seconds
    re.compile(rf"\[\s*{_NUMBER}(?:\s*,\s*{_NUMBER}){{3}}\s*\]"),                              # [x1, y1, x2, y2]
    re.compile(rf"\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)\s*,\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)"),  # (x1,y1),(x2,y2)
    re.compile(r'"[^"\n]{1,200}"'),                                                          # "quoted OCR text"
    re.compile(r"“[^”\n]{1,200}”"),
]
# Tool-call JSON scaffolding: {"name": …, "arguments": {…}} — the keys and the outer braces are format.
_TOOL_SCAFFOLD = re.compile(r'^\s*\{\s*"name"\s*:\s*|\s*,\s*"arguments"\s*:\s*|\}\s*$')


def token_strings_from_ids(token_ids: Sequence[int], decode: Callable[[list[int]], str] | Sequence[str]) -> list[str]:
    """Decode each token on its own.

    decode: a callable taking a one-element id list (e.g. `tokenizer.decode`), or a vocabulary list indexed
    by id. Byte-level tokens that are part of a multi-byte character may decode to a replacement character;
    the structural patterns here are ASCII, so that does not move any boundary that matters.
    """
    if callable(decode):
        return [decode([int(token_id)]) for token_id in token_ids]
    return [decode[int(token_id)] for token_id in token_ids]


def _paint(char_cats: np.ndarray, start: int, stop: int, category: TokenCategory) -> None:
    """Set characters [start, stop) to category where it has higher priority than what is there."""
    region = char_cats[start:stop]
    if region.size:
        np.maximum(region, _PRIORITY[category], out=region)


def _find_all(text: str, needle: str) -> list[int]:
    positions, start = [], text.find(needle) if needle else -1
    while start != -1:
        positions.append(start)
        start = text.find(needle, start + len(needle))
    return positions


def label_token_categories(token_strings: Sequence[str], *, special_token_mask: Sequence[bool] | None = None,
                           markers: ChatMarkers = ChatMarkers()) -> list[TokenCategory]:
    """One TokenCategory per response token (see the module docstring for the rules).

    token_strings: the response's tokens decoded one by one; special_token_mask: optional per-token flags
    (e.g. `id in tokenizer.all_special_ids`) that force FORMAT whatever the text says.
    """
    if special_token_mask is not None and len(special_token_mask) != len(token_strings):
        raise ValueError(f"special_token_mask has {len(special_token_mask)} entries for {len(token_strings)} tokens")
    text = "".join(token_strings)
    by_priority = {priority: category for category, priority in _PRIORITY.items()}
    char_cats = np.zeros(len(text), dtype=np.int8)                      # ANSWER everywhere to start

    # Think spans: walk the tags in order. A close tag before any open tag means the template opened the
    # think span in the prompt, so the response starts inside it.
    tags = sorted([(p, "open") for p in _find_all(text, markers.think_open)]
                  + [(p, "close") for p in _find_all(text, markers.think_close)])
    inside = bool(tags) and tags[0][1] == "close"
    cursor = 0
    for position, kind in tags:
        if inside:
            _paint(char_cats, cursor, position, TokenCategory.REASONING)
        tag_len = len(markers.think_open if kind == "open" else markers.think_close)
        _paint(char_cats, position, position + tag_len, TokenCategory.FORMAT)
        inside, cursor = kind == "open", position + tag_len
    if inside:
        _paint(char_cats, cursor, len(text), TokenCategory.REASONING)

    # Tool calls: arguments inside, tags and JSON scaffolding are format. An unclosed call runs to the end.
    tool_spans = []
    for open_at in _find_all(text, markers.tool_open):
        body_start = open_at + len(markers.tool_open)
        close_at = text.find(markers.tool_close, body_start)
        body_stop = close_at if close_at != -1 else len(text)
        tool_spans.append((body_start, body_stop))
        _paint(char_cats, open_at, body_start, TokenCategory.FORMAT)
        if close_at != -1:
            _paint(char_cats, close_at, close_at + len(markers.tool_close), TokenCategory.FORMAT)
        _paint(char_cats, body_start, body_stop, TokenCategory.TOOL_ARGS)
        body = text[body_start:body_stop]
        for match in _TOOL_SCAFFOLD.finditer(body):
            _paint(char_cats, body_start + match.start(), body_start + match.end(), TokenCategory.FORMAT)

    def in_tool_call(start: int, stop: int) -> bool:
        return any(start < body_stop and stop > body_start for body_start, body_stop in tool_spans)

    # Perception, outside tool calls.
    for pattern in _PERCEPTION_PATTERNS:
        for match in pattern.finditer(text):
            if not in_tool_call(match.start(), match.end()):
                _paint(char_cats, match.start(), match.end(), TokenCategory.PERCEPTION)
    for open_at in _find_all(text, markers.box_open):
        body_start = open_at + len(markers.box_open)
        close_at = text.find(markers.box_close, body_start)
        _paint(char_cats, body_start, close_at if close_at != -1 else len(text), TokenCategory.PERCEPTION)

    # Format last (highest priority): special tokens and literal tags.
    for match in re.finditer(markers.special_token_regex, text):
        _paint(char_cats, match.start(), match.end(), TokenCategory.FORMAT)
    for tag in markers.extra_format_tags:
        for position in _find_all(text, tag):
            _paint(char_cats, position, position + len(tag), TokenCategory.FORMAT)

    categories: list[TokenCategory | None] = []
    offset = 0
    for index, token in enumerate(token_strings):
        stop = offset + len(token)
        if special_token_mask is not None and special_token_mask[index]:
            categories.append(TokenCategory.FORMAT)
        elif stop > offset:
            categories.append(by_priority[int(char_cats[offset:stop].max())])
        else:
            categories.append(None)                                     # decodes to "": fill from a neighbour
        offset = stop
    return _fill_empty(categories)


def _fill_empty(categories: list[TokenCategory | None]) -> list[TokenCategory]:
    filled: list[TokenCategory | None] = list(categories)
    previous = None
    for i, category in enumerate(filled):
        if category is None:
            filled[i] = previous
        else:
            previous = category
    following = TokenCategory.ANSWER
    for i in range(len(filled) - 1, -1, -1):                            # leading empties take the next label
        if filled[i] is None:
            filled[i] = following
        else:
            following = filled[i]
    return filled  # type: ignore[return-value]


def _category_key(key: TokenCategory | str) -> TokenCategory:
    if isinstance(key, TokenCategory):
        return key
    try:
        return TokenCategory[str(key).upper()]
    except KeyError:
        valid = ", ".join(c.name.lower() for c in TokenCategory)
        raise ValueError(f"unknown token category {key!r}; valid categories: {valid}") from None


def category_weights(categories: Sequence[TokenCategory], weights: Mapping[TokenCategory | str, float]) -> list[float]:
    """Raw per-token weights c (before `mopd.normalise_token_weights` brings them to mean 1 over the batch).

    weights: category (enum or name: "format", "reasoning", "answer", "perception", "tool_args") → weight ≥ 0;
    categories left out weigh 1.
    """
    table = dict(DEFAULT_CATEGORY_WEIGHTS)
    for key, value in weights.items():
        if value < 0:
            raise ValueError(f"token category weight for {key!r} must be ≥ 0, got {value}")
        table[_category_key(key)] = float(value)
    return [table[category] for category in categories]


def find_loop_start(token_ids: Sequence[int], *, min_ngram: int = 1, max_ngram: int = 64, min_repeats: int = 4,
                    min_loop_tokens: int = 32) -> int:
    """τ: the first position where the response starts looping, or len(token_ids) if it never does.

    A loop is an n-gram (min_ngram ≤ n ≤ max_ngram) repeated back to back at least `min_repeats` times,
    spanning at least `min_loop_tokens` tokens (so that e.g. a number's repeated digit tokens or a short
    "...." are not loops). τ is where the first copy starts.

    Method: for each n, match[i] = (x[i] == x[i+n]); a run of L consecutive matches starting at p means
    x[p : p+n+L] has period n, i.e. (n+L)/n copies. The first p where a run of the required length starts
    is the loop start for that n; τ is the minimum over n. O(T · n_max) vectorised comparisons.
    """
    if min_ngram < 1 or max_ngram < min_ngram or min_repeats < 2 or min_loop_tokens < 1:
        raise ValueError(f"need 1 ≤ min_ngram ≤ max_ngram, min_repeats ≥ 2, min_loop_tokens ≥ 1; got "
                         f"min_ngram={min_ngram}, max_ngram={max_ngram}, min_repeats={min_repeats}, "
                         f"min_loop_tokens={min_loop_tokens}")
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    best = length
    for n in range(min_ngram, min(max_ngram, length // min_repeats) + 1):
        # the looping span is n + run_needed tokens: ≥ min_repeats copies and ≥ min_loop_tokens tokens
        run_needed = max((min_repeats - 1) * n, min_loop_tokens - n)
        if run_needed > length - n:
            continue
        matches = (tokens[:-n] == tokens[n:]).astype(np.int32)                      # [T-n]
        running = np.concatenate(([0], np.cumsum(matches)))
        window_sums = running[run_needed:] - running[:-run_needed]                    # matches in [p, p+run)
        hits = np.flatnonzero(window_sums == run_needed)
        if hits.size and hits[0] < best:
            best = int(hits[0])
    return best


def loop_starts(responses: Sequence[Sequence[int]], **options) -> list[int]:
    """find_loop_start for each response of a batch (options as find_loop_start)."""
    return [find_loop_start(response, **options) for response in responses]
