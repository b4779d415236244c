"""`posttrain score`: output contract, pass-through, malformed lines, summary, custom rewards."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from posttrain import score as score_cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    score_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["score", *argv])
    return args.func(args)


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


ROWS = [
    {"completion": r"so \boxed{\frac{1}{2}}", "ground_truth": "0.5", "id": "a", "meta": {"k": [1, 2]}},
    {"completion": "The answer is 7.", "ground_truth": "8", "id": "b"},
    {"completion": "", "ground_truth": "8", "id": "c", "data_source": "gsm8k", "extra_info": {"split": "test"}},
]


@pytest.mark.unit
def test_scores_and_passes_other_fields_through(tmp_path, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, ROWS)
    assert run(["--reward", "math", str(source), "-o", str(out), "--workers", "1", "--no-progress"]) == 0
    rows = read_jsonl(out)
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.0]
    for original, scored in zip(ROWS, rows):
        assert {k: scored[k] for k in original} == original  # untouched
    assert rows[0]["details"]["method"] == "boxed"
    assert rows[2]["details"]["failure"] == "no_answer"
    summary = capsys.readouterr().err
    assert "mean score 0.3333 over 3 well-formed lines" in summary
    assert "no_answer 1" in summary


@pytest.mark.unit
def test_malformed_lines_are_named_and_do_not_lose_others(tmp_path, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [ROWS[0], "{not json", "", json.dumps([1, 2]), {"ground_truth": "1"},
                         {"completion": 3, "ground_truth": "1"}, {"completion": "x"},
                         {"completion": "x", "ground_truth": 1, "extra_info": "oops"}, ROWS[1]])
    assert run(["--reward", "math", str(source), "-o", str(out), "--workers", "1", "--no-progress"]) == 3
    rows = read_jsonl(out)
    assert len(rows) == 8  # the blank line is skipped; every other line has its output line
    assert rows[0]["score"] == 1.0 and rows[-1]["id"] == "b"
    malformed = rows[1:-1]
    assert [r["line"] for r in malformed] == [2, 4, 5, 6, 7, 8]
    assert all(r["score"] == 0.0 and r["details"]["failure"] == "malformed_line" for r in malformed)
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err
    assert "line 5: missing field 'completion'" in err
    assert "line 6: field 'completion' must be a string" in err
    assert "line 7: missing field 'ground_truth'" in err
    assert "line 8: field 'extra_info' must be an object" in err
    assert "6 malformed lines" in err


@pytest.mark.unit
def test_usage_errors(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, ROWS)
    assert run(["--reward", "nonexistent", str(source)]) == 2
    assert "neither a built-in name" in capsys.readouterr().err
    assert run(["--reward", "iou", "--reward-kwargs", "{bad", str(source)]) == 2
    assert "--reward-kwargs is not valid JSON" in capsys.readouterr().err
    assert run(["--reward", "length", "--reward-kwargs", '{"max_len": 3}', str(source)]) == 2
    assert "no keyword argument" in capsys.readouterr().err
    assert run(["--reward", "math", str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.unit
def test_reward_kwargs_and_custom_file_reward(tmp_path):
    reward_file = tmp_path / "rw.py"
    reward_file.write_text("def score(data_source, solution_str, ground_truth, extra_info=None, scale=1.0):\n"
                           "    return {'score': scale * len(solution_str), 'src': data_source,\n"
                           "            'note': extra_info.get('note')}\n")
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"completion": "abc", "ground_truth": None, "data_source": "d", "extra_info": {"note": 1}}])
    assert run(["--reward", f"{reward_file}:score", "--reward-kwargs", '{"scale": 2}', str(source),
                "-o", str(out), "--workers", "1", "--no-progress"]) == 0
    row = read_jsonl(out)[0]
    assert row["score"] == 6.0 and row["details"] == {"src": "d", "note": 1}


@pytest.mark.integration
def test_whole_command_in_parallel_with_progress_and_a_bomb(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = []
    for i in range(200):
        rows.append({"completion": rf"\boxed{{\frac{{{i}}}{{2}}}}", "ground_truth": str(i / 2), "i": i})
    rows.insert(50, {"completion": r"\boxed{\sum_{k=1}^{10^{12}} k^{k}}", "ground_truth": "1", "i": -1})
    write_jsonl(source, rows)
    proc = subprocess.run([sys.executable, "-m", "posttrain.score", "--reward", "math",
                           "--reward-kwargs", '{"timeout_s": 1.0}', str(source), "-o", str(out), "--workers", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    scored = read_jsonl(out)
    assert [r["i"] for r in scored] == [r["i"] for r in rows]  # input order kept
    assert sum(r["score"] for r in scored) == 200
    assert scored[50]["details"]["failure"] == "timeout"
    assert "201/201" in proc.stderr  # the progress bar reached the end
    assert "failures (score 0 for a counted reason): timeout 1" in proc.stderr


@pytest.mark.integration
def test_iou_and_tiou_through_the_command(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"completion": "[0, 0, 500, 500]", "ground_truth": [0, 0, 100, 50],
                          "extra_info": {"image_size": [200, 100]}}])
    assert run(["--reward", "iou", "--reward-kwargs", '{"coords": "relative1000"}', str(source),
                "-o", str(out), "--workers", "1", "--no-progress"]) == 0
    assert read_jsonl(out)[0]["score"] == pytest.approx(1.0)
    write_jsonl(source, [{"completion": "<answer>2 to 6</answer>", "ground_truth": [4, 6]}])
    assert run(["--reward", "tiou", str(source), "-o", str(out), "--workers", "1", "--no-progress"]) == 0
    assert read_jsonl(out)[0]["score"] == pytest.approx(0.5)


HOSTILE_LINES_REWARD = '''
import os, signal, threading

def score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "huge":
        return 10 ** 400
    if solution_str == "lock":
        return {"score": 0.25, "lock": threading.Lock()}
    if solution_str == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    print("a reward that prints must not corrupt the output on stdout")
    return len(solution_str)
'''


@pytest.mark.unit
@pytest.mark.parametrize("output_to_stdout", [False, True])
def test_one_bad_line_scores_zero_with_a_reason_and_the_rest_are_written(tmp_path, capfd, output_to_stdout):
    reward_file = tmp_path / "hostile.py"
    reward_file.write_text(HOSTILE_LINES_REWARD)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    completions = ["ab", "huge", "abc", "lock", "segfault", "abcd"]
    write_jsonl(source, [{"completion": c, "ground_truth": None, "id": i} for i, c in enumerate(completions)])
    argv = ["--reward", f"{reward_file}:score", str(source), "--workers", "1", "--no-progress"]
    assert run(argv + ([] if output_to_stdout else ["-o", str(out)])) == 0
    captured = capfd.readouterr()
    text = captured.out if output_to_stdout else out.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows] == list(range(6))
    assert [r["score"] for r in rows] == [2.0, 0.0, 3.0, 0.25, 0.0, 4.0]
    assert rows[1]["details"]["failure"] == "non_finite"
    assert rows[3]["details"]["lock"].startswith("<unlocked _thread.lock")  # the score stands, the detail as text
    assert rows[4]["details"]["failure"] == "crash:worker_died"
    assert "failures (score 0 for a counted reason): non_finite 1, crash:worker_died 1" in captured.err


@pytest.mark.unit
def test_a_reward_without_verls_keyword_signature_is_refused_before_scoring(tmp_path, capsys):
    reward_file = tmp_path / "gsm8k.py"
    reward_file.write_text('def compute_score(solution_str, ground_truth, method="strict", format_score=0.0, '
                           'score=1.0):\n    return 1.0\n')
    source = tmp_path / "in.jsonl"
    write_jsonl(source, ROWS)
    assert run(["--reward", f"{reward_file}:compute_score", str(source), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot be called the way verl and posttrain call rewards" in err and "wrap it" in err
