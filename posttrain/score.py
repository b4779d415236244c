"""`posttrain score`: score a JSONL file of completions offline with any reward.

    posttrain score --reward math completions.jsonl -o scored.jsonl
    posttrain score --reward iou --reward-kwargs '{"coords": "relative1000"}' boxes.jsonl
    posttrain score --reward my_rewards.py:compute_score in.jsonl -o -

Each input line: {"completion": str, "ground_truth": any, "data_source": str (optional),
"extra_info": {} (optional)}; every other field passes through untouched. Each output line is the
input plus "score" (float) and "details" (the reward's other keys; a zero caused by bad input
carries "failure" there, e.g. "no_answer", "timeout"). Output order = input order; blank lines are
skipped. A line that is not a JSON object with those fields is reported on stderr as `line N: ...`
and still gets an output line — {"line": N, "score": 0.0, "details": {"failure": "malformed_line",
"error": ...}} — so no other line's result is lost; the exit status is then 3 (0 when every line was
well formed). Scoring runs in `--workers` worker processes (default: all CPUs), with a progress bar
and a summary (mean score, failures by kind) on stderr. It uses the training runs' reward runner
(posttrain/rewards_runner.py) and its failure rules: a reward that raises, hangs past --timeout-s,
kills its worker (segfault), or returns a non-number or a score not finite in float32 scores that line
0 with a counted reason (exception:Type, timeout, crash:worker_died, bad_result:..., non_finite); the
other lines are scored and written.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any, Iterator

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MALFORMED_LINES = 3
CHUNK_LINES = 32



def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `score` sub-command to a `posttrain` argparse sub-parser set."""
    parser = subparsers.add_parser(
        "score", help="score a JSONL of completions with any reward",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT.jsonl", help="completions to score ('-' for stdin)")
    parser.add_argument("--reward", required=True, metavar="NAME_OR_DOTPATH",
                        help="built-in name (math, iou, tiou, format, length, boxed_format, compose, code, "
                             "judge) or 'package.module:function' or 'path/file.py:function'")
    parser.add_argument("--reward-kwargs", default=None, metavar="JSON",
                        help='keyword arguments bound to the reward, e.g. \'{"coords": "relative1000"}\'')
    parser.add_argument("-o", "--output", default="-", metavar="OUT.jsonl",
                        help="where to write scored lines (default '-': stdout)")
    parser.add_argument("--workers", type=int, default=None,
                        help="scoring processes (default: the number of CPUs this process may use)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="wall-clock seconds one line's reward may take (default 30); beyond it the worker is killed "
                             "and that line scores 0 with failure 'timeout'")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


# ---------------------------------------------------------------------------------------------
# Pure pieces: line validation and the summary
# ---------------------------------------------------------------------------------------------

def parse_line(raw: str) -> tuple[dict | None, str | None]:
    """(record, None) for a valid input line, or (None, error message saying what to fix)."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "completion" not in record:
        return None, "missing field 'completion' (the model's output text)"
    if not isinstance(record["completion"], str):
        return None, f"field 'completion' must be a string, got {type(record['completion']).__name__}"
    if "ground_truth" not in record:
        return None, "missing field 'ground_truth' (use null if the reward needs none)"
    if record.get("data_source") is not None and not isinstance(record["data_source"], str):
        return None, f"field 'data_source' must be a string, got {type(record['data_source']).__name__}"
    if record.get("extra_info") is not None and not isinstance(record["extra_info"], dict):
        return None, f"field 'extra_info' must be an object, got {type(record['extra_info']).__name__}"
    return record, None


class Summary:
    """Running totals for the end-of-run report."""

    def __init__(self):
        self.scored = 0
        self.score_sum = 0.0
        self.malformed = 0
        self.failures: collections.Counter[str] = collections.Counter()

    def add(self, score: float, failure: str | None) -> None:
        self.scored += 1
        self.score_sum += score
        if failure:
            self.failures[failure] += 1

    def lines(self, reward: str, seconds: float) -> list[str]:
        total = self.scored + self.malformed
        rate = total / seconds if seconds > 0 else float("inf")
        out = [f"scored {total} lines with reward {reward!r} in {seconds:.2f}s ({rate:.0f} lines/s)"]
        mean = self.score_sum / self.scored if self.scored else 0.0
        out.append(f"mean score {mean:.4f} over {self.scored} well-formed lines"
                   + (f"; {self.malformed} malformed lines (see 'line N:' messages)" if self.malformed else ""))
        if self.failures:
            kinds = ", ".join(f"{kind} {count}" for kind, count in self.failures.most_common())
            out.append(f"failures (score 0 for a counted reason): {kinds}")
        else:
            out.append("failures: none")
        return out


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")
    try:
        for number, raw in enumerate(stream, start=1):
            yield number, raw
    finally:
        if stream is not sys.stdin:
            stream.close()


def _count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _parsed_lines(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, record or error message) per non-blank line; a malformed line travels as its message."""
    for number, raw in _read_lines(path):
        if raw.strip():
            record, error = parse_line(raw)
            yield number, record if record is not None else error


def _preload_modules(spec: str) -> list[str]:
    """The reward's module, imported once by the worker processes' forkserver (a worker killed for a time-out
    is replaced without re-importing sympy)."""
    from rewards.base import BUILTIN_REWARDS
    target = BUILTIN_REWARDS.get(spec, spec).rpartition(":")[0]
    return [] if not target or target.endswith(".py") else [target]


def main(args: argparse.Namespace) -> int:
    """Run `posttrain score` with parsed arguments; returns the exit status."""
    from rewards import RewardSpecError, bind_reward

    kwargs = None
    if args.reward_kwargs:
        try:
            kwargs = json.loads(args.reward_kwargs)
        except json.JSONDecodeError as err:
            print(f"posttrain score: --reward-kwargs is not valid JSON ({err.msg} at column {err.colno}); "
                  f"""give an object such as '{{"coords": "relative1000"}}'""", file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(kwargs, dict):
            print("posttrain score: --reward-kwargs must be a JSON object of keyword arguments, "
                  f"got {type(kwargs).__name__}", file=sys.stderr)
            return EXIT_USAGE
    try:
        bind_reward(args.reward, kwargs)  # fail here, before any process starts, on a bad spec
    except RewardSpecError as err:
        print(f"posttrain score: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.input != "-" and not os.path.isfile(args.input):
        print(f"posttrain score: input file {args.input!r} does not exist", file=sys.stderr)
        return EXIT_USAGE
    if args.workers is not None and args.workers < 1:
        print(f"posttrain score: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_USAGE
    if not args.timeout_s > 0:
        print(f"posttrain score: --timeout-s must be > 0, got {args.timeout_s}", file=sys.stderr)
        return EXIT_USAGE
    if args.output != "-":
        problem = _output_problem(args.input, args.output)
        if problem:
            print(f"posttrain score: {problem}", file=sys.stderr)
            return EXIT_USAGE
    from rewards._pool import default_worker_count
    workers = args.workers or default_worker_count()

    from posttrain.rewards_runner import LocalProcesses, RewardFn, prepare_reward_servers, release_reward_servers
    try:
        (reward_fn,) = prepare_reward_servers([RewardFn(args.reward, 1.0, tuple(sorted((kwargs or {}).items())),
                                                         None)])
    except RewardSpecError as err:
        print(f"posttrain score: {err}", file=sys.stderr)
        return EXIT_USAGE

    started = time.perf_counter()
    summary = Summary()
    backend = LocalProcesses(workers, preload=_preload_modules(args.reward))
    out = sys.stdout if args.output == "-" else _OutputFile(args.output)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=_count_lines(args.input), unit="line", file=sys.stderr, dynamic_ncols=True)
    try:
        for row in _scored_rows(args.input, reward_fn, backend, workers, args.timeout_s, summary):
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            if progress is not None:
                progress.update(1)
        if out is not sys.stdout:
            out.commit()
    finally:
        if progress is not None:
            progress.close()
        if out is not sys.stdout:
            out.discard()  # nothing left to discard after commit()
        else:
            out.flush()
        backend.close()
        release_reward_servers()
    for line in summary.lines(args.reward, time.perf_counter() - started):
        print(line, file=sys.stderr)
    return EXIT_MALFORMED_LINES if summary.malformed else EXIT_OK


def _output_problem(input_path: str, output_path: str) -> str | None:
    """Why `-o output_path` cannot be written, or None. The input itself is refused by real path (a symlink or
    another spelling of the same file included): it would be emptied before it is read."""
    target = os.path.realpath(output_path)
    if input_path != "-" and (target == os.path.realpath(input_path)
                              or (os.path.exists(output_path) and os.path.samefile(output_path, input_path))):
        stem = os.path.splitext(input_path)[0]
        return (f"-o {output_path} is the input file {input_path}; scoring it in place would destroy the input: "
                f"pass another output path, e.g. -o {stem}.scored.jsonl")
    if os.path.isdir(output_path):
        return f"-o {output_path} is a folder; pass a file path such as {os.path.join(output_path, 'scored.jsonl')}"
    if _is_special(output_path):  # /dev/stdout, a pipe: written in place
        return None
    if not os.path.isdir(os.path.dirname(target)):
        return f"-o {output_path}: folder {os.path.dirname(target)} does not exist; create it or pass another path"
    return None


def _is_special(path: str) -> bool:
    """An existing output that is not a regular file or folder: a device (/dev/null), a pipe (/dev/stdout)."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


class _OutputFile:
    """Scored lines go to a temporary file beside the output, renamed over it by commit() once every line is
    written: an interrupted or failed run leaves any previous output untouched and no half-written file. A target
    that exists and is not a regular file (/dev/stdout, /dev/null, a named pipe) is written in place: renaming
    over it would replace the device or pipe itself."""

    def __init__(self, path: str):
        import tempfile
        if _is_special(path):
            self.tmp_path = None
            self.handle = open(path, "w", encoding="utf-8")
            return
        self.target = os.path.realpath(path)  # through a symlink: replace the file it names, not the link
        folder, name = os.path.split(self.target)
        fd, self.tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        self.handle = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.handle.write(text)

    def commit(self) -> None:
        self.handle.close()
        if self.tmp_path is None:  # written in place
            return
        if os.path.exists(self.target):
            mode = os.stat(self.target).st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # what open(path, "w") would have given (mkstemp makes it 0600)
        os.chmod(self.tmp_path, mode)
        os.replace(self.tmp_path, self.target)
        self.tmp_path = None

    def discard(self) -> None:
        self.handle.close()
        if self.tmp_path is not None:
            os.unlink(self.tmp_path)
            self.tmp_path = None


def _scored_rows(path: str, reward_fn, backend, workers: int, timeout_s: float, summary: Summary) -> Iterator[dict]:
    """Output rows in input order: well-formed lines go through the reward runner (which reads them lazily), a
    malformed line gets its row, in its place, as soon as the lines before it are written."""
    from posttrain.rewards_runner import score_stream

    lines: collections.deque = collections.deque()  # (number, record or error) read but not yet written

    def samples() -> Iterator[dict]:
        for number, item in _parsed_lines(path):
            lines.append((number, item))
            if isinstance(item, dict):
                yield {"data_source": item.get("data_source") or "", "solution": item["completion"],
                       "ground_truth": item["ground_truth"], "extra_info": item.get("extra_info") or {}}

    def malformed_row(number: int, error: str) -> dict:
        print(f"line {number}: {error}", file=sys.stderr)
        summary.malformed += 1
        return {"line": number, "score": 0.0, "details": {"failure": "malformed_line", "error": error}}

    # Enough lines read ahead that the other workers keep going while one waits out a slow answer's time
    # limit (output order makes the writer wait for it), few enough to bound memory.
    results = score_stream([reward_fn], samples(), backend, timeout_s=timeout_s, max_concurrency=workers,
                           samples_per_task=CHUNK_LINES, max_pending=16 * CHUNK_LINES * workers)
    for result in results:
        while isinstance(lines[0][1], str):
            yield malformed_row(*lines.popleft())
        _, record = lines.popleft()
        details = dict(result["details"].get(reward_fn.name, {}))
        failure = result["failures"][0] if result["failures"] else None
        if failure is not None:
            details["failure"] = failure
        summary.add(result["score"], failure)
        yield {**record, "score": result["score"], "details": details}
    while lines:
        yield malformed_row(*lines.popleft())


def _standalone_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain score", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone_main())
