"""The `math` reward: is the completion's final answer mathematically equal to the reference?

Pipeline (each step a pure function below, except the last):
1. `extract_final_answer`: the last `<answer>...</answer>` block if there is one, and inside it (or
   the whole completion) the last balanced `\\boxed{...}` / `\\fbox{...}`, else the text after the
   last "answer is" / "Answer:" / GSM8K's "####", else the whole completion if it is one short line.
   Never the last number in the text: a completion without a final answer scores 0 ("no_answer").
   Every step is linear in the completion's length (it runs outside the killable worker).
2. `normalise_answer`: strip math delimiters, trailing punctuation, unicode math, LaTeX spacing,
   synonymous commands (`\\dfrac` → `\\frac`, `\\leqslant` → `\\le`, ...), unit words after a
   number, thousands separators, plain scientific notation.
3. Exact fast paths that need no sympy: plain numbers (exact rational comparison, `x = 3` → 3,
   `50%` = 50 = 0.5 but never 0.5 = 50), multiple-choice letters, text answers.
4. Everything else goes to Math-Verify (parse + verify, on sympy) inside a killable worker process
   (rewards._pool) with a CPU-time limit (and a wall-clock cap), so `\\boxed{9^{9^{9^{9}}}}` costs
   at most `timeout_s` of CPU, and a busy machine does not turn a right answer into a time-out.

Why Math-Verify: it is the best-measured open verifier (sets vs tuples, intervals, matrices,
relations, units, percentages, its asymmetry rules), kept up by Hugging Face and itself built on
sympy. What we do not take from it: its answer extraction (its default falls back to the last number
anywhere in the text — a reward hack) and its timeout (signal.alarm: main thread only).
"""
from __future__ import annotations

import logging
import math
import re
from fractions import Fraction
from functools import lru_cache
from typing import Any

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_ANSWER_CHARS = 1000
DEFAULT_BARE_ANSWER_MAX_CHARS = 80
MAX_GROUND_TRUTHS = 8
_MAX_FAST_DIGITS = 200  # longer numerals go to sympy (inside the killable worker)

# ---------------------------------------------------------------------------------------------
# 1. Extraction
# ---------------------------------------------------------------------------------------------

_ANSWER_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(r"</answer>", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_BOXED_TOKEN_RE = re.compile(r"\s*([^\s$]+)")
# "the answer is", "final answer is:", "Answer:", "**Final Answer:**", "answer is: ...", a line "Answer $9$",
# and GSM8K's "#### 72" (verl's GSM8K preprocessing asks the model for exactly this).
_ANCHOR_RE = re.compile(r"\b(?:final\s+)?answer(?:\s*\*\*)?\s*(?:is(?![\w'’])\s*:?|:)(?:\s*\*\*)?"
                        r"|^[ \t]*(?:final\s+)?answer[ \t]*(?=\$|\\\[|\\\()"  # at a line start only
                        r"|####", re.IGNORECASE | re.MULTILINE)
# Display math may span lines; inline math (`$...$`, `\\(...\\)`) may not, as in Math-Verify.
_LEADING_MATH_RE = re.compile(r"\s*(?:\$\$(.+?)\$\$|\$([^\n]+?)\$|\\\(([^\n]+?)\\\)|\\\[(.+?)\\\])", re.DOTALL)


def matching_braces(text: str) -> dict[int, int]:
    """Map the index of every balanced `{` to the index of its `}` in one linear pass.

    Escaped braces (`\\{`, `\\}`) are set delimiters in LaTeX, not grouping, and are skipped.
    Unbalanced braces simply have no entry, so hostile input cannot make the caller loop.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
            continue
        if char == "\\":
            escaped = True
        elif char == "{":
            stack.append(index)
        elif char == "}" and stack:
            pairs[stack.pop()] = index
    return pairs


def last_answer_block(text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>` block, or None.

    Found from the last `</answer>` backwards, in linear time: a lazy `<answer>(.*?)</answer>` regex
    rescans the rest of the text from every unclosed `<answer>` (10,000 of them took 23 s).
    """
    last_close = None
    for last_close in _ANSWER_CLOSE_RE.finditer(text):
        pass
    if last_close is None:
        return None
    opening = None
    for opening in _ANSWER_OPEN_RE.finditer(text, 0, last_close.start()):
        pass
    if opening is None:
        return None
    first_close = _ANSWER_CLOSE_RE.search(text, opening.end())  # "<answer>1</answer> 2</answer>" → "1"
    return text[opening.end():first_close.start()]


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` or `\\fbox{...}` (nested braces allowed),
    or of a trailing `\\boxed 5` (no braces). None when there is none."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    pairs: dict[int, int] | None = None
    for match in reversed(list(_BOXED_RE.finditer(text))):
        if match.group(1) is None:  # `\boxed 5`: the next whitespace-free token
            token = _BOXED_TOKEN_RE.match(text, match.end())  # no slicing: linear over many `\boxed $`
            if token:
                return token.group(1)
            continue
        if pairs is None:
            pairs = matching_braces(text)
        open_index = match.end() - 1
        close_index = pairs.get(open_index)
        if close_index is not None:
            return text[open_index + 1:close_index]
    return None


def _after_anchor(text: str) -> tuple[str, str] | None:
    """(text following the last "answer is" / "Answer:" / "####" anchor, cut at the end of its
    line/sentence; "answer_is" or "gsm8k"), or None without an anchor."""
    last = None
    for last in _ANCHOR_RE.finditer(text):
        pass
    if last is None:
        return None
    method = "gsm8k" if last.group().startswith("#") else "answer_is"
    rest = text[last.end():]
    math_env = _LEADING_MATH_RE.match(rest)
    if math_env:
        return next(group for group in math_env.groups() if group is not None), method
    rest = rest.lstrip().split("\n", 1)[0]
    # A sentence ends at ". " (not at the point of 3.5).
    rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]
    return rest.strip(), method


def extract_final_answer(completion: str, bare_answer_max_chars: int = DEFAULT_BARE_ANSWER_MAX_CHARS
                         ) -> tuple[str | None, str]:
    """Return (answer, method) with method in boxed / answer_is / gsm8k / answer_tag / bare / none.

    The last `<answer>` block, when present, is the only region searched: text outside it cannot
    contribute an answer. No fallback to "the last number in the text".
    """
    tagged = last_answer_block(completion)
    region = completion if tagged is None else tagged
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed, "boxed"
    anchored = _after_anchor(region)
    if anchored is not None:
        return anchored
    if tagged is not None:
        return region, "answer_tag"
    stripped = completion.strip()
    if stripped and "\n" not in stripped and len(stripped) <= bare_answer_max_chars:
        return stripped, "bare"
    return None, "none"


# ---------------------------------------------------------------------------------------------
# 2. Normalisation
# ---------------------------------------------------------------------------------------------

_UNICODE_MATH = {
    "π": r"\pi ", "∞": r"\infty ", "−": "-", "–": "-", "×": r"\times ", "·": r"\cdot ", "÷": r"\div ",
    "√": r"\sqrt ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ", "°": r"^\circ ", "∪": r"\cup ", "½": "1/2",
}
# A leading group of 1-3 digits not starting with 0: "0,111" is a decimal comma (0.111), never 111.
_THOUSANDS_RE = re.compile(r"^-?[1-9]\d{0,2}(?:(?:,|\{,\}|\\,|\\ |\\!|\s)\d{3})+(?:\.\d+)?$")
_SEPARATOR_RE = re.compile(r",|\{,\}|\\,|\\ |\\!|\s")
_SCIENTIFIC_RE = re.compile(r"^(-?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)$")
_DELIMITERS = (("$$", "$$"), ("$", "$"), (r"\(", r"\)"), (r"\[", r"\]"))
# Commands LaTeX writers use interchangeably for one symbol → the one form we compare.
_SYNONYMS = {"dfrac": r"\frac", "tfrac": r"\frac", "leqslant": r"\le", "leq": r"\le", "geqslant": r"\ge",
             "geq": r"\ge", "neq": r"\ne", "rightarrow": r"\to", "infinity": r"\infty", "lt": "<", "gt": ">"}
# One left-to-right scan: `\\` (a matrix row break) is matched first so that `\\ ` is never read as `\ `.
_LATEX_LAYOUT_RE = re.compile(
    r"(\\\\)"                                                            # 1: row break, kept
    r"|(\\!\s*)"                                                          # 2: negative thin space (`11,\! 111`)
    r"|(\\[,;: ]|\\(?:q?quad|enspace|thinspace|medspace|thickspace)(?![A-Za-z])|~)"  # 3: spacing
    r"|\\(" + "|".join(sorted(_SYNONYMS, key=len, reverse=True)) + r")(?![A-Za-z])"     # 4: synonym
    r"|(\\(?:left|right)(?![A-Za-z])\s*\.?)"                               # 5: sizing of delimiters
    r"|\\(?:mathrm|mathit|operatorname)\s*\{\s*([A-Za-z])\s*\}")              # 6: `\mathrm{e}` → e
# "961 dollars", "5 people", "12 cm": unit words after a plain number (not "5 or more", "2 pi").
_UNIT_WORDS_RE = re.compile(r"^(-?\d[\d,]*(?:\.\d+)?\s*(?:\\?%)?)\s+([A-Za-z]{2,}\.?(?:\s+[A-Za-z]{2,}\.?){0,2})$")
_NOT_UNIT_WORDS = {"or", "and", "to", "plus", "minus", "times", "over", "divided", "by", "mod", "not"}


def canonical_latex(text: str) -> str:
    """Spacing commands become spaces (`\\!` nothing), synonyms one form (`\\dfrac` → `\\frac`,
    `\\leqslant` → `\\le`, `\\rightarrow` → `\\to`), `\\left(` → `(`, `\\mathrm{e}` → `e`."""
    def replace(match: re.Match) -> str:
        row_break, negative_space, spacing, synonym, sizing, roman_letter = match.groups()
        if row_break:
            return row_break
        if spacing:
            return " "
        if synonym:
            following = match.string[match.end():match.end() + 1]
            return _SYNONYMS[synonym] + (" " if following.isalpha() else "")  # `\leq x` must not become `\lex`
        if roman_letter:
            return roman_letter
        return ""  # negative space, \left / \right
    return _LATEX_LAYOUT_RE.sub(replace, text)


def strip_unit_words(text: str) -> str:
    """`961 dollars` → `961`; anything else unchanged."""
    match = _UNIT_WORDS_RE.match(text)
    if not match:
        return text
    words = {word.rstrip(".").lower() for word in match.group(2).split()}
    if words & (_NOT_UNIT_WORDS | _MATH_WORDS):
        return text
    return match.group(1).strip()


def layout_free(text: str) -> str:
    """The answer without layout whitespace, for an identity check. LaTeX ignores spaces in math, but
    a space between letters or digits is kept: `\\to x` is not `\\tox`, and a reference `2 3` (two
    answers) must not equal `23`."""
    text = re.sub(r"\s+", " ", text.strip())
    return re.sub(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])", "", text)


def normalise_answer(answer: str) -> str:
    """Surface clean-up that never changes the value: delimiters, punctuation, unicode, separators."""
    text = answer.replace("\n", " ").strip()
    for char, latex in _UNICODE_MATH.items():
        if char in text:
            text = text.replace(char, latex)
    text = canonical_latex(text)
    changed = True
    while changed:  # peel wrappers in any order: "**$5$.**"
        changed = False
        stripped = text.strip().rstrip(".,;").strip()  # not "!": 5! is a factorial
        if stripped.startswith("**") and stripped.endswith("**") and len(stripped) > 4:
            stripped = stripped[2:-2]
        for left, right in _DELIMITERS:
            if stripped.startswith(left) and stripped.endswith(right) and len(stripped) > len(left) + len(right):
                stripped = stripped[len(left):-len(right)]
                break
        stripped = stripped.replace(r"\displaystyle", "").strip()
        changed = stripped != text
        text = stripped
    text = text.replace("\\$", "").replace("$", "")  # stray inline-math markers or currency: never part of the value
    for currency in "€£¥":
        text = text.replace(currency, "")
    text = strip_unit_words(text.strip())
    if _THOUSANDS_RE.match(text):
        text = _SEPARATOR_RE.sub("", text)
    scientific = _SCIENTIFIC_RE.match(text)
    if scientific:
        text = f"{scientific.group(1)}\\times 10^{{{int(scientific.group(2))}}}"
    return text


# ---------------------------------------------------------------------------------------------
# 3. Fast paths: plain numbers, multiple-choice letters, text answers
# ---------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(
    r"^(?:[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*)?"          # "x = 3" → 3 (an assignment of the value)
    r"(?:\\\$\s*)?"                                   # currency sign "\$10"
    r"(-?)\s*(\d+(?:\.\d*)?|\.\d+)"                   # the numeral
    r"(?:\s*\\times\s*10\^\{?([+-]?\d{1,4})\}?)?"     # scientific notation (normalised form)
    r"\s*(\\?%)?$")
# "1000,99" / "0,111": a decimal comma (thousands separators were already removed by normalise_answer).
_DECIMAL_COMMA_RE = re.compile(r"^(-?)\s*(\d{1,50}),(\d{1,50})\s*(\\?%)?$")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_MC_GOLD_RE = re.compile(r"^\(?\s*([A-J])\s*\)?$")
_MC_PRED_RE = re.compile(r"^\(?\s*([A-Ja-j])\s*(?:\)|\.|:|(?=\s)|$)(.*)$", re.DOTALL)
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "lg", "exp", "sqrt", "pi", "infty",
               "inf", "lim", "max", "min", "det", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
               "mod", "gcd", "lcm", "frac", "cdot", "times", "le", "ge", "circ"}
_SHORT_TEXT_WORDS = {"no", "yes"}


_FRACTION_RE = re.compile(
    r"^(?:[a-zA-Z]\s*=\s*)?(-?)\s*(?:\\[dt]?frac\s*\{\s*(\d{1,50})\s*\}\s*\{\s*(\d{1,50})\s*\}"
    r"|\\[dt]?frac\s*(\d)(\d)|(\d{1,50})\s*/\s*(\d{1,50}))$")


def parse_plain_fraction(answer: str) -> Fraction | None:
    """Exact value of `\\frac{3}{4}`, `\\dfrac34`, `-3/4`, `x = 3/4`; None otherwise (or for /0)."""
    match = _FRACTION_RE.match(answer.strip())
    if not match:
        return None
    sign, *parts = match.groups()
    numerator, denominator = [int(p) for p in parts if p is not None]
    if denominator == 0:
        return None
    value = Fraction(numerator, denominator)
    return -value if sign else value


def _terminates(value: Fraction) -> bool:
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def plain_values_equal(gold: str, pred: str) -> bool | None:
    """Exact verdict for plain numbers and fractions (see `plain_numbers_equal`), or None when
    either side is something else. A fraction with a non-terminating decimal expansion against a
    decimal (1/3 vs 0.333333) is left to Math-Verify's rounding rules (None)."""
    gold_number, pred_number = parse_plain_number(gold), parse_plain_number(pred)
    gold_fraction = parse_plain_fraction(gold) if gold_number is None else None
    pred_fraction = parse_plain_fraction(pred) if pred_number is None else None
    if gold_number is not None and pred_number is not None:
        return plain_numbers_equal(gold_number, pred_number)
    if gold_fraction is not None and pred_fraction is not None:
        return gold_fraction == pred_fraction
    if gold_fraction is not None and pred_number is not None:
        fraction, number, number_text = gold_fraction, pred_number, pred
    elif pred_fraction is not None and gold_number is not None:
        fraction, number, number_text = pred_fraction, gold_number, gold
    else:
        return None
    if "." in number_text and not _terminates(fraction):
        return None
    return plain_numbers_equal((fraction, False), number)


def parse_plain_number(answer: str) -> tuple[Fraction, bool] | None:
    """(exact value, has a percent sign) for a plain numeral such as `-3`, `0.50`, `x = 3`, `50\\%`,
    `1.5\\times 10^{-3}`; None for anything else (which then goes to sympy)."""
    match = _NUMBER_RE.match(answer.strip())
    if not match:
        decimal_comma = _DECIMAL_COMMA_RE.match(answer.strip())
        if decimal_comma is None:
            return None
        sign, integer, fraction, percent = decimal_comma.groups()
        value = Fraction(f"{integer}.{fraction}")
        return (-value if sign else value), percent is not None
    sign, digits, exponent, percent = match.groups()
    if len(digits) > _MAX_FAST_DIGITS:
        return None
    value = Fraction(digits.rstrip(".") or "0")
    if exponent is not None:
        value *= Fraction(10) ** int(exponent)
    return (-value if sign else value), percent is not None


def plain_numbers_equal(gold: tuple[Fraction, bool], pred: tuple[Fraction, bool]) -> bool:
    """Exact comparison; a percent sign means "either the number shown or a hundredth of it"
    (so gold 50% accepts 50% / 50 / 0.5 and gold 0.5 accepts 50%), but a bare 50 never equals
    0.5: no ×100 leniency between unmarked numbers."""
    def readings(parsed: tuple[Fraction, bool]) -> set[Fraction]:
        value, is_percent = parsed
        return {value, value / 100} if is_percent else {value}
    return bool(readings(gold) & readings(pred))


def unwrap_text(answer: str) -> str:
    """`\\text{(B)}` → `(B)`; repeated so nested wrappers also come off."""
    for _ in range(4):
        unwrapped = _TEXT_WRAPPER_RE.sub(r"\1", answer)
        if unwrapped == answer:
            break
        answer = unwrapped
    return answer.strip()


def multiple_choice_letter(gold: str) -> str | None:
    """The letter when the reference is a multiple-choice option A–J (`B`, `(B)`, `\\text{(B)}`)."""
    match = _MC_GOLD_RE.match(unwrap_text(gold))
    return match.group(1) if match else None


def predicted_letter(answer: str) -> str | None:
    """The option letter a prediction names: `B`, `(B)`, `b`, `B.`, `B) 42`, `\\textbf{B}`.

    A prediction naming two options ("B and C", "B) or A") names none: listing every option must
    not collect the reward.
    """
    match = _MC_PRED_RE.match(unwrap_text(answer))
    if not match:
        return None
    letter, rest = match.group(1).upper(), match.group(2)
    if re.search(r"(?<![A-Za-z])[A-J](?![A-Za-z])", rest):
        return None
    return letter


def _text_words(answer: str) -> list[str] | None:
    plain = unwrap_text(answer)
    if not re.fullmatch(r"[A-Za-z][A-Za-z '\-]*\.?", plain):
        return None
    return plain.rstrip(".").lower().replace("-", " ").split()


def is_text_answer(gold: str) -> bool:
    """A reference made of words (`yes`, `Monday`, `\\text{east}`, `no solution`), compared as text.

    Single short letter groups (`x`, `ab`) and function names stay mathematics, because sympy
    reads `ab` as a·b and a text comparison would wrongly reject `ba`.
    """
    words = _text_words(gold)
    if not words:
        return False
    if any(word in _MATH_WORDS for word in words):
        return False
    wrapped = gold.strip() != unwrap_text(gold)
    return wrapped or len(words) > 1 or len(words[0]) >= 3 or words[0] in _SHORT_TEXT_WORDS


def normalise_text(answer: str) -> str:
    """Lower case, no punctuation or articles, single spaces: `The Answer's East.` → `answer s east`."""
    text = unwrap_text(answer).lower()
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return " ".join(word for word in text.split() if word not in {"a", "an", "the"})


# ---------------------------------------------------------------------------------------------
# 4. Symbolic comparison (runs inside the killable worker)
# ---------------------------------------------------------------------------------------------

def _parse_latex(answer: str) -> list:
    from math_verify import LatexExtractionConfig, parse
    # One inline-math environment holding exactly the extracted answer: Math-Verify's own search
    # for answers in free text (and its last-number fallback) never sees model prose.
    return parse(f"${answer}$", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                 fallback_mode="first_match", parsing_timeout=None)


@lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str) -> tuple:
    # n samples per prompt share one reference: parse it once per worker.
    return tuple(_parse_latex(gold))


def _quiet_math_verify() -> None:
    # We disable Math-Verify's signal timeout on purpose (the worker is killed instead); its
    # per-call warning about that, and its per-failure parse warnings, would flood the logs.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


MAX_RESULT_DIGITS = 100_000  # no real answer has more digits; computing one can take hours


def log10_upper_bound(expr) -> float | None:
    """An upper bound on log10|value| for a numeric tree of numbers, +, ×, powers and factorials
    (math.inf when astronomically large); None when the tree is not purely numeric.

    Lets the worker refuse `9^{9^{9^{9}}}` in microseconds instead of burning its whole time
    limit; the wall-clock kill stays the backstop for everything this does not recognise.
    """
    from sympy import Add, Mul, Pow, factorial
    if expr.is_Integer:
        return math.log10(abs(int(expr))) if expr != 0 else 0.0
    if expr.is_Rational:  # the size of its representation, which is what computing with it costs
        return max(math.log10(abs(int(expr.p))), math.log10(int(expr.q)))
    if expr.is_Float:
        return max(math.log10(abs(float(expr))), 0.0) if float(expr) != 0 else 0.0
    if expr.is_NumberSymbol:
        return 1.0
    if isinstance(expr, Pow):
        base, exponent = log10_upper_bound(expr.base), log10_upper_bound(expr.exp)
        if base is None or exponent is None:
            return None
        if exponent > 300:
            return math.inf
        return base * 10 ** exponent
    if isinstance(expr, factorial):
        argument = log10_upper_bound(expr.args[0])
        if argument is None:
            return None
        if argument > 300:
            return math.inf
        n = 10 ** argument
        return n * max(math.log10(n), 1.0)
    if isinstance(expr, (Add, Mul)):
        parts = [log10_upper_bound(arg) for arg in expr.args]
        if any(part is None for part in parts):
            return None
        return sum(parts) + math.log10(len(parts))
    return None


def too_large_to_evaluate(expr, max_nodes: int = 10_000) -> bool:
    """True when some numeric sub-expression would have more than MAX_RESULT_DIGITS digits
    (e.g. `x^{9^{9^9}}`: its exponent alone is too large to compute)."""
    from sympy import Basic, preorder_traversal
    if not isinstance(expr, Basic):
        return False
    for count, node in enumerate(preorder_traversal(expr)):
        if count >= max_nodes:
            return False  # the wall-clock limit will deal with it
        if node.is_Pow or node.func.__name__ == "factorial":
            bound = log10_upper_bound(node)
            if bound is not None and bound > MAX_RESULT_DIGITS:
                return True
    return False


def symbolic_equal(gold: str, pred: str) -> tuple[bool, str | None]:
    """Worker task: (equal, failure kind or None). Math-Verify's verify is asymmetric on purpose
    (gold first): e.g. a gold inequality `x>1` accepts the interval `(1,\\infty)`, not the reverse."""
    from math_verify import verify
    from sympy import Basic, MatrixBase
    _quiet_math_verify()
    gold_parsed = list(_parse_gold_cached(gold))
    pred_parsed = _parse_latex(pred)
    if not any(isinstance(item, (Basic, MatrixBase)) for item in gold_parsed):
        # Nothing, or only the text Math-Verify could not read (or a fragment of it, as for
        # `1 - \frac{1}{\mathrm{e}}` before we rewrote `\mathrm{e}`): never score against that.
        return False, "gold_parse_error"
    if not pred_parsed:
        return False, "parse_error"
    if any(too_large_to_evaluate(item) for item in gold_parsed):
        return False, "gold_too_large"
    if any(too_large_to_evaluate(item) for item in pred_parsed):
        return False, "too_large"
    equal = bool(verify(gold_parsed, pred_parsed, strict=True, timeout_seconds=None))
    if not equal and not any(isinstance(item, (Basic, MatrixBase)) for item in pred_parsed):
        return False, "parse_error"
    return equal, None


def warm_up() -> None:
    """Exercise the parser and verifier once (run in the pool's zygote before it forks workers)."""
    for gold, pred in [(r"\frac{1}{2}", "0.5"), (r"[1, 2)", r"(1,2]"), (r"\{1,2\}", r"x^2+\sqrt{3}\pi"),
                       (r"\begin{pmatrix}1&2\end{pmatrix}", r"x>1"), (r"x=3", r"10\%")]:
        symbolic_equal(gold, pred)
    _parse_gold_cached.cache_clear()


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------

def reference_answers(ground_truth: Any, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> list[str] | None:
    """The accepted reference answers as strings (a list means "any of these"); None if unusable
    (including a reference answer longer than `max_answer_chars`)."""
    items = list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    if not items or len(items) > MAX_GROUND_TRUTHS:
        return None
    answers = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            return None
        if isinstance(item, float) and not math.isfinite(item):
            return None
        text = item if isinstance(item, str) else repr(item)
        # A full reference solution: its boxed answer, or GSM8K's "#### 72", is the reference.
        boxed = last_boxed(text)
        if boxed is not None:
            text = boxed
        elif "####" in text:
            text = text[text.rindex("####") + 4:].strip().split("\n", 1)[0]
        if len(text) > max_answer_chars:  # checked before normalising: keeps the clean-up linear
            return None
        text = normalise_answer(text)
        if not text:
            return None
        answers.append(text)
    return answers


def _result(score: float, method: str, extracted: str | None, failure: str | None = None) -> dict:
    result: dict[str, Any] = {"score": score, "method": method}
    if extracted is not None:
        result["extracted"] = extracted[:200]
    if failure is not None:
        result["failure"] = failure
    return result


def _compare(gold: str, pred: str, timeout_s: float, notes: dict[str, Any]) -> tuple[bool, str | None]:
    """One reference against one prediction: fast paths first, then the killable sympy worker.
    `notes` collects details worth logging (`cpu_starved`)."""
    letter = multiple_choice_letter(gold)
    if letter is not None:
        return predicted_letter(pred) == letter, None
    if is_text_answer(gold):
        return normalise_text(gold) == normalise_text(pred), None
    if layout_free(gold) == layout_free(pred):  # the same LaTeX, even where sympy cannot read it (`x\to\infty`)
        return True, None
    verdict = plain_values_equal(gold, pred)
    if verdict is not None:
        return verdict, None
    from rewards._pool import shared_pool
    outcome = shared_pool().call("rewards.matheq:symbolic_equal", (gold, pred), timeout_s)
    if outcome.wall_s is not None and outcome.wall_s > timeout_s:
        # The verifier took longer than its limit in wall time but not in CPU time: the machine
        # was busy. Counted, so that a run can see how often the limit would have bitten.
        notes["cpu_starved"] = True
    if outcome.status == "ok":
        return outcome.value
    kind = {"timeout": "timeout", "memory": "memory_limit", "crashed": "worker_crashed"}.get(
        outcome.status, f"verifier_error:{outcome.error}")
    return False, kind


def compute_score(data_source: str | None, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
                  bare_answer_max_chars: int = DEFAULT_BARE_ANSWER_MAX_CHARS) -> dict:
    """1.0 when the completion's final answer equals the reference (any of them, for a list), else 0.0.

    Never raises. The verifier may use `timeout_s` seconds of CPU time per reference, and waits at
    most 5 x `timeout_s` wall-clock seconds for it on a busy machine (detail `cpu_starved` when it
    waited past `timeout_s`). Failure kinds (score 0):
    bad_input, bad_ground_truth, no_answer, answer_too_long, parse_error, gold_parse_error, timeout,
    memory_limit, worker_crashed.
    """
    if not isinstance(solution_str, str):
        return _result(0.0, "none", None, "bad_input")
    golds = reference_answers(ground_truth, max_answer_chars)
    if golds is None:
        return _result(0.0, "none", None, "bad_ground_truth")
    raw_answer, method = extract_final_answer(solution_str, bare_answer_max_chars)
    if raw_answer is None:
        return _result(0.0, method, None, "no_answer")
    if len(raw_answer) > max_answer_chars:
        return _result(0.0, method, raw_answer, "answer_too_long")
    pred = normalise_answer(raw_answer)
    if not pred:
        return _result(0.0, method, raw_answer, "no_answer")
    failure, notes = None, {}
    for gold in golds:
        equal, failure = _compare(gold, pred, timeout_s, notes)
        if equal:
            return {**_result(1.0, method, pred), **notes}
    return {**_result(0.0, method, pred, failure), **notes}
