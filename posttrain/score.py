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
well formed). Scoring runs in `--workers` processes (default: all CPUs), with a progress bar and a
summary (mean score, failures by kind) on stderr.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterator

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MALFORMED_LINES = 3
CHUNK_LINES = 32

# Per scoring process, the reward (bound once by the pool initializer).
_reward_fn = None


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
# Scoring (in worker processes, or in-process with --workers 1)
# ---------------------------------------------------------------------------------------------

def _init_worker(spec: str, kwargs: dict | None) -> None:
    global _reward_fn
    # Each scoring process already uses one CPU: give each one verifier process for the math
    # reward (unless the user chose), so the machine is not oversubscribed N×N.
    os.environ.setdefault("POSTTRAIN_VERIFY_WORKERS", "1")
    from rewards import bind_reward
    _reward_fn = bind_reward(spec, kwargs)


def _score_chunk(chunk: list[tuple[int, dict]]) -> list[tuple[float, dict, str | None]]:
    from rewards import call_reward
    results = []
    for _, record in chunk:
        outcome = call_reward(_reward_fn, record.get("data_source") or "", record["completion"],
                              record["ground_truth"], record.get("extra_info") or {})
        results.append((outcome.score, outcome.details, outcome.failure))
    return results


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


def _chunks(path: str, malformed_out: list) -> Iterator[list[tuple[int, Any]]]:
    """Chunks of (line number, record or error message); malformed lines travel as str."""
    chunk: list[tuple[int, Any]] = []
    for number, raw in _read_lines(path):
        if not raw.strip():
            continue
        record, error = parse_line(raw)
        chunk.append((number, record if record is not None else error))
        if len(chunk) >= CHUNK_LINES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Scorer:
    """Runs chunks in a process pool (or in-process); a crashed pool is rebuilt and the chunk
    retried once, after which its lines score 0 with failure "scorer_crashed"."""

    def __init__(self, spec: str, kwargs: dict | None, workers: int):
        self.spec, self.kwargs, self.workers = spec, kwargs, workers
        self.pool = self._new_pool() if workers > 1 else None
        if self.pool is None:
            _init_worker(spec, kwargs)

    def _new_pool(self):
        # spawn: a clean interpreter per worker, safe whatever threads the caller runs.
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(self.spec, self.kwargs))

    def submit(self, records: list[tuple[int, dict]]):
        if self.pool is None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(_score_chunk(records))
            return future
        return self.pool.submit(_score_chunk, records)

    def result(self, future, records) -> list[tuple[float, dict, str | None]]:
        try:
            return future.result()
        except BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            try:
                return self.pool.submit(_score_chunk, records).result()
            except BrokenProcessPool:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = self._new_pool()
                return [(0.0, {"error": "the scoring process died on this chunk"}, "scorer_crashed")
                        for _ in records]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


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
    if args.output != "-":
        problem = _output_problem(args.input, args.output)
        if problem:
            print(f"posttrain score: {problem}", file=sys.stderr)
            return EXIT_USAGE
    from rewards._pool import default_worker_count
    workers = args.workers or default_worker_count()

    started = time.perf_counter()
    summary = Summary()
    scorer = _Scorer(args.reward, kwargs, workers)
    out = sys.stdout if args.output == "-" else _OutputFile(args.output)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=_count_lines(args.input), unit="line", file=sys.stderr, dynamic_ncols=True)
    try:
        window: collections.deque = collections.deque()
        for chunk in _chunks(args.input, []):
            records = [(n, item) for n, item in chunk if isinstance(item, dict)]
            window.append((chunk, records, scorer.submit(records) if records else None))
            # Enough chunks in flight that the other workers keep going while one waits out a
            # slow answer's time limit (output order makes the writer wait for it), few enough
            # to bound memory (16 chunks of 32 lines per worker).
            while len(window) > 16 * workers:
                _write_chunk(window.popleft(), scorer, out, summary, progress)
        while window:
            _write_chunk(window.popleft(), scorer, out, summary, progress)
        if out is not sys.stdout:
            out.commit()
    finally:
        if progress is not None:
            progress.close()
        if out is not sys.stdout:
            out.discard()  # nothing left to discard after commit()
        else:
            out.flush()
        scorer.close()
    for line in summary.lines(args.reward, time.perf_counter() - started):
        print(line, file=sys.stderr)
    return EXIT_MALFORMED_LINES if summary.malformed else EXIT_OK


def _output_problem(input_path: str, output_path: str) -> str | None:
    """Why `-o output_path` cannot be written, or None. The input itself is refused by real path (a symlink or
    another spelling of the same file included): it would be emptied before it is read."""
    target = os.path.realpath(output_path)
    if input_path != "-" and (target == os.path.realpath(input_path)
                              or (os.path.exists(target) and os.path.samefile(target, input_path))):
        stem = os.path.splitext(input_path)[0]
        return (f"-o {output_path} is the input file {input_path}; scoring it in place would destroy the input: "
                f"pass another output path, e.g. -o {stem}.scored.jsonl")
    if os.path.isdir(target):
        return f"-o {output_path} is a folder; pass a file path such as {os.path.join(output_path, 'scored.jsonl')}"
    if not os.path.isdir(os.path.dirname(target)):
        return f"-o {output_path}: folder {os.path.dirname(target)} does not exist; create it or pass another path"
    return None


class _OutputFile:
    """Scored lines go to a temporary file beside the output, renamed over it by commit() once every line is
    written: an interrupted or failed run leaves any previous output untouched and no half-written file."""

    def __init__(self, path: str):
        import tempfile
        self.target = os.path.realpath(path)  # through a symlink: replace the file it names, not the link
        folder, name = os.path.split(self.target)
        fd, self.tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        self.handle = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.handle.write(text)

    def commit(self) -> None:
        self.handle.close()
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
        if self.tmp_path is not None:
            self.handle.close()
            os.unlink(self.tmp_path)
            self.tmp_path = None


def _write_chunk(entry, scorer: _Scorer, out, summary: Summary, progress) -> None:
    chunk, records, future = entry
    results = iter(scorer.result(future, records) if future is not None else [])
    for number, item in chunk:
        if isinstance(item, str):
            print(f"line {number}: {item}", file=sys.stderr)
            summary.malformed += 1
            row = {"line": number, "score": 0.0, "details": {"failure": "malformed_line", "error": item}}
        else:
            score, details, failure = next(results)
            details = dict(details)
            if failure is not None:
                details["failure"] = failure
            summary.add(score, failure)
            row = {**item, "score": score, "details": details}
        out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    if progress is not None:
        progress.update(len(chunk))


def _standalone_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain score", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone_main())
