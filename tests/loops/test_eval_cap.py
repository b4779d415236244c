"""data.eval_max_prompts caps the held-out set without dropping whole files: with two eval files of 64 rows and a
cap of 64, the first file alone used to fill the cap, so a two-environment recipe was evaluated on one."""
import json

import pytest

from posttrain.data import load_prompt_rows

pytestmark = [pytest.mark.unit]


def _file(tmp_path, name, n):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{name} {i}"}],
                                                      "data_source": name, "reward_model": {"ground_truth": i}}) + "\n" for i in range(n)))
    return str(path)


def test_capped_eval_set_interleaves_files(tmp_path):
    a, b, c = _file(tmp_path, "a", 5), _file(tmp_path, "b", 2), _file(tmp_path, "c", 3)
    rows = load_prompt_rows([a, b, c], max_rows=7)
    assert [r["prompt"][0]["content"] for r in rows] == ["a 0", "b 0", "c 0", "a 1", "b 1", "c 1", "a 2"]
    everything = load_prompt_rows([a, b, c])
    assert [r["prompt"][0]["content"] for r in everything][:6] == ["a 0", "a 1", "a 2", "a 3", "a 4", "b 0"]   # uncapped: file order
    assert len(load_prompt_rows([a, b, c], max_rows=100)) == 10
