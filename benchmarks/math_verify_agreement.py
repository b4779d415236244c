"""Agreement of `posttrain score --reward math` with Math-Verify's own public test cases.

    .venv/bin/python benchmarks/math_verify_agreement.py                 # score tests/data/math_verify_cases.jsonl
    .venv/bin/python benchmarks/math_verify_agreement.py --extract GIT_DIR  # regenerate that file

The cases are the (gold, prediction, expected) rows of the `pytest.mark.parametrize` tables in
Math-Verify's tests/*.py (huggingface/Math-Verify; `--extract` takes a bare clone's git directory and
reads its HEAD). Each row also keeps the options its Math-Verify test passes to `verify` (precision,
strict, ...): we score every row with our defaults, so rows whose expectation depends on a
non-default option are reported apart. Each prediction is the completion, the gold the ground truth.
Prints the agreement and every disagreement (`--json` writes them for REWARDS.md).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(REPO, "tests", "data", "math_verify_cases.jsonl")
TEST_FILES = ("tests/test_all.py", "tests/test_boxed.py", "tests/test_numina_cases.py", "tests/test_open_thoughts.py",
              "tests/test_strict.py", "tests/test_yujianll.py")
# Names Math-Verify's tables use for the three columns.
GOLD, PRED, EXPECTED = ("gold",), ("pred",), ("expected", "result")


def _literal(node: ast.AST):
    # f-strings such as f"{math.sqrt(17):.15f}" are not literals; the source is Math-Verify's own tests.
    return eval(compile(ast.Expression(node), "<case>", "eval"), {"math": math})  # noqa: S307


def _keyword_options(function: ast.FunctionDef) -> dict:
    """Constant keyword arguments of the `compare_strings(...)` call in a test body (precision=5, ...)."""
    options = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "compare_strings":
            for keyword in node.keywords:
                if keyword.arg and isinstance(keyword.value, ast.Constant):
                    options[keyword.arg] = keyword.value.value
    return options


def extract_cases(git_dir: str) -> list[dict]:
    commit = subprocess.check_output(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], text=True).strip()
    cases = []
    for path in TEST_FILES:
        source = subprocess.check_output(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], text=True)
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, ast.FunctionDef):
                continue
            for decorator in function.decorator_list:
                if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize"):
                    continue
                names = [name.strip() for name in _literal(decorator.args[0]).split(",")]
                columns = {name: index for index, name in enumerate(names)}
                gold = next((columns[n] for n in GOLD if n in columns), None)
                pred = next((columns[n] for n in PRED if n in columns), None)
                expected = next((columns[n] for n in EXPECTED if n in columns), None)
                if None in (gold, pred, expected):
                    continue
                for row in decorator.args[1].elts:
                    values = _literal(row)
                    options = {**_keyword_options(function),
                               **{n: values[i] for n, i in columns.items() if i not in (gold, pred, expected)}}
                    cases.append({"gold": values[gold], "prediction": values[pred], "expected": int(values[expected]),
                                  "source": f"{path}::{function.name}", "options": options,
                                  "math_verify_commit": commit})
    return cases


def score_cases(cases: list[dict]) -> list[float]:
    """Scores through the real command: `python -m posttrain.score --reward math IN -o OUT`."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(inputs, "w") as handle:
            for case in cases:
                handle.write(json.dumps({"completion": case["prediction"], "ground_truth": case["gold"]}) + "\n")
        subprocess.run([sys.executable, "-m", "posttrain.score", "--reward", "math", inputs, "-o", outputs,
                        "--no-progress"], check=True, cwd=REPO, stderr=subprocess.DEVNULL)
        with open(outputs) as handle:
            return [json.loads(line) for line in handle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extract", metavar="GIT_DIR", help="regenerate the cases from a Math-Verify git directory")
    parser.add_argument("--json", metavar="OUT", help="also write the disagreements as JSON")
    args = parser.parse_args()
    if args.extract:
        cases = extract_cases(args.extract)
        with open(CASES, "w") as handle:
            for case in cases:
                handle.write(json.dumps(case, ensure_ascii=False) + "\n")
        print(f"wrote {len(cases)} cases to {os.path.relpath(CASES, REPO)}")
        return
    with open(CASES) as handle:
        cases = [json.loads(line) for line in handle if line.strip()]
    results = score_cases(cases)
    disagreements = []
    for case, result in zip(cases, results):
        if int(result["score"] == 1.0) != case["expected"]:
            disagreements.append({**case, "ours": result["score"], "details": result.get("details", {})})
    agree = len(cases) - len(disagreements)
    print(f"agreement with Math-Verify's test expectations: {agree}/{len(cases)} = {agree / len(cases):.1%}")
    print(f"  we accept, Math-Verify expects 0: {sum(d['ours'] == 1.0 for d in disagreements)}; "
          f"we reject, Math-Verify expects 1: {sum(d['ours'] != 1.0 for d in disagreements)}")
    timeouts = sum(r.get("details", {}).get("failure") == "timeout" for r in results)
    starved = sum(bool(r.get("details", {}).get("cpu_starved")) for r in results)
    print(f"  time-outs: {timeouts}; verifier calls that waited past their limit on a busy machine (cpu_starved): "
          f"{starved}")
    for d in disagreements:
        print(f"- {d['source']}  gold={d['gold']!r}  pred={d['prediction']!r}  expected={d['expected']} "
              f"ours={d['ours']}  {d['details'].get('failure', '')}  options={d['options']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(disagreements, handle, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
