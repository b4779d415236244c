"""verl-compatible prompt datasets and a seeded, resumable cursor.

Rows: `prompt` (chat messages), `data_source`, `reward_model.ground_truth`, `extra_info`; JSONL or Parquet,
loaded with Hugging Face `datasets`. Every row is checked up front; a bad row is an error naming file, row and
field, before any heavy work starts.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np


class DatasetError(ValueError):
    pass


def _load_rows(path: str) -> list[dict]:
    import datasets

    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as err:  # noqa: BLE001 — arrow schema errors etc., re-phrased for the user
        undecodable = _name_undecodable_line(path) if kind == "json" and _is_decode_error(err) else None
        if undecodable is not None:
            raise undecodable from None
        raise DatasetError(f"cannot read dataset {path}: {type(err).__name__}: {str(err)[:400]}. Each line must be "
                           "a JSON object with `prompt`, `data_source`, `reward_model.ground_truth`; fields must "
                           "keep one type across rows (store mixed ground truths as JSON strings)") from None
    try:
        return ds.to_list()
    except UnicodeDecodeError:  # arrow keeps the raw bytes; decoding fails only here, for the whole file
        raise _name_undecodable_row(ds, path) from None


def _is_decode_error(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, UnicodeDecodeError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _name_undecodable_line(path: str) -> DatasetError | None:
    """The first line of a JSON(L) file that is not UTF-8 (when bad bytes stop the reader itself, e.g. in a key)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return DatasetError(f"{path} line {number}: not valid UTF-8 (bytes {line[err.start:err.end].hex(' ')} "
                                    f"at byte {err.start + 1}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t "
                                    "utf-8) or remove the row")
    return None


def _name_undecodable_row(ds, path: str) -> DatasetError:
    """The first row whose text is not UTF-8 (rows decoded one at a time: slow, but only on this error path)."""
    for i in range(len(ds)):
        try:
            ds[i]
        except UnicodeDecodeError as err:
            bad = err.object[err.start:err.end].hex(" ")
            return DatasetError(f"{path} row {i + 1}: text is not valid UTF-8 (bytes {bad}); re-save the file as "
                                "UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the row")
    return DatasetError(f"{path}: text is not valid UTF-8; re-save the file as UTF-8")


def validate_row(row: dict, where: str, base_dir: str | None = None) -> dict:
    """Check one row; return it normalised (extra_info always a dict; media paths absolute, resolved against
    `base_dir`, the data file's folder). Raises DatasetError naming the field."""
    def fail(field: str, problem: str, fix: str) -> DatasetError:
        return DatasetError(f"{where}: `{field}` {problem}; {fix}")

    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise fail("prompt", f"must be a non-empty list of chat messages, got {type(prompt).__name__}",
                   'write it as [{"role": "user", "content": "..."}]')
    for j, msg in enumerate(prompt):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not _is_content(msg.get("content")):
            raise fail(f"prompt[{j}]", "must be an object with string `role` and `content` (a string, or a list "
                       'of parts {"type": "text", "text": ...} / {"type": "image"} / {"type": "video"})',
                       'e.g. {"role": "user", "content": "What is 2+2?"}')
    if not isinstance(row.get("data_source"), str) or not row["data_source"]:
        raise fail("data_source", f"must be a non-empty string, got {row.get('data_source')!r}",
                   "name the task family, e.g. \"toy/add\"")
    rm = row.get("reward_model")
    if not isinstance(rm, dict) or "ground_truth" not in rm or rm["ground_truth"] is None:
        raise fail("reward_model.ground_truth", "is missing", 'add "reward_model": {"ground_truth": ...}')
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        raise fail("extra_info", f"must be an object, got {type(extra).__name__}", "use {} or omit it")
    out = dict(row)
    out["extra_info"] = dict(extra or {})
    from posttrain.vl.media import check_row_media, has_media   # images / videos (verl-style multimodal rows)
    return check_row_media(out, where, base_dir) if has_media(out) else out


def _is_content(content) -> bool:
    return isinstance(content, str) or (
        isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image", "video")
                                          and (p["type"] != "text" or isinstance(p.get("text"), str))
                                          for p in content))


def load_prompt_rows(paths: list[str], max_rows: int | None = None) -> list[dict]:
    """Every row of `paths`, checked, in file order. With `max_rows`, the files are interleaved (row 1 of each file,
    then row 2, ...) before the cut, so a capped held-out set still covers every file instead of only the first."""
    per_file = []
    for path in paths:
        base_dir = os.path.dirname(os.path.abspath(path))   # media paths are relative to the data file
        per_file.append([validate_row(row, f"{path} row {i + 1}", base_dir) for i, row in enumerate(_load_rows(path))])
    if paths and not any(per_file):
        raise DatasetError(f"datasets {paths} hold no rows; add prompts or fix the paths")
    if max_rows is None:
        return [row for rows in per_file for row in rows]
    interleaved = [rows[i] for i in range(max(map(len, per_file), default=0)) for rows in per_file if i < len(rows)]
    return interleaved[:max_rows]


@dataclasses.dataclass
class DataCursor:
    """Which rows come next. The order of epoch e is a permutation seeded by (seed, e), so the cursor is fully
    described by (epoch, position) and a resumed run sees exactly the rows it would have seen."""
    num_rows: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def next_indices(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = min(k - len(out), self.num_rows - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise DatasetError(f"the checkpoint's dataset had {state['num_rows']} rows, the recipe's has "
                               f"{self.num_rows}; resume with the same training files")
        self.epoch, self.position = state["epoch"], state["position"]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Chat template → token ids (tokenised separately from the response: no BPE merge crosses the boundary)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def dump_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)
