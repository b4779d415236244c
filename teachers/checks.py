"""Start-up checks of the teachers against the student, without loading torch or an engine.

MOPD compares teacher and student log-probs of the SAME token ids, so every teacher must use the student's
tokenizer and vocabulary. Teachers may be of different architectures (text-only and vision-language teachers in
one run): they are grouped by architecture (`teacher_groups`, the config fingerprint), each group gets its own
engines, and weights are swapped only within a group. A teacher whose routed rows carry images or videos must
be a vision-language model (`check_teachers_see_media`). Each problem is an error naming the teacher, the
mismatch and the fix.
"""
from __future__ import annotations

import collections
import glob
import json
import os

from posttrain.config import RecipeError
from teachers.routing import row_modality

# Config keys that do not change what an engine computes with the weights (bookkeeping); every other key must
# agree for one engine to take another teacher's weights in memory (shapes, rotary settings, norms, vision tower).
BOOKKEEPING_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype",
                              "use_cache"})


class TeacherConfigError(RecipeError):
    pass


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def tokenizer_fingerprint(model_dir: str) -> dict:
    """token → id of the whole vocabulary, including added/special tokens (from tokenizer.json)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise TeacherConfigError(f"{model_dir} has no tokenizer.json; save the tokenizer with "
                                 "`tokenizer.save_pretrained(folder)` (a fast tokenizer) next to the weights")
    tok = _read_json(path)
    vocab = dict(tok.get("model", {}).get("vocab", {}))
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def vocab_size(cfg: dict):
    """The LM head's vocabulary size: top-level in a text model's config, in `text_config` in a VLM's."""
    return cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))


def is_vision_language(cfg: dict) -> bool:
    return "vision_config" in cfg


def _strip_bookkeeping(node):
    if isinstance(node, dict):
        return {k: _strip_bookkeeping(v) for k, v in node.items() if k not in BOOKKEEPING_KEYS}
    return [_strip_bookkeeping(v) for v in node] if isinstance(node, list) else node


def architecture_fingerprint(cfg: dict) -> str:
    """The config without bookkeeping keys, as canonical JSON: teachers with equal fingerprints can share an engine
    by swapping weights (same shapes AND same computation: rotary settings, norms, vision tower)."""
    return json.dumps(_strip_bookkeeping(cfg), sort_keys=True)


def _config_differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (for error messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted((set(a) | set(b)) - BOOKKEEPING_KEYS)
                for d in _config_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def teacher_groups(teachers) -> list[list[int]]:
    """Teacher indices grouped by architecture fingerprint, groups and members in recipe order. Reads each
    teacher's config.json (check_teachers has checked they exist)."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(teachers):
        groups.setdefault(architecture_fingerprint(_read_json(os.path.join(t.path, "config.json"))), []).append(i)
    return list(groups.values())


def engines_per_group(group_sizes: list[int], resident_engines: int) -> list[int]:
    """Engines kept by each architecture group: one each, then the rest one at a time to the group with the most
    teachers per engine (never more engines than a group has teachers). One group: min(resident_engines, M)."""
    if resident_engines < len(group_sizes):
        raise TeacherConfigError(f"{len(group_sizes)} teacher architectures need at least {len(group_sizes)} "
                                 f"engines; algorithm.resident_engines = {resident_engines}")
    counts = [1] * len(group_sizes)
    for _ in range(resident_engines - len(group_sizes)):
        open_groups = [g for g, size in enumerate(group_sizes) if counts[g] < size]
        if not open_groups:
            break
        counts[max(open_groups, key=lambda g: group_sizes[g] / counts[g])] += 1
    return counts


def check_teachers(recipe) -> None:
    """Paths, weights, vocabulary, tokenizer and k of every teacher, and enough engines for their architectures;
    raises TeacherConfigError."""
    mopd = recipe.algorithm
    student_dir = recipe.model.path
    student_cfg = _read_json(os.path.join(student_dir, "config.json"))
    student_vocab = tokenizer_fingerprint(student_dir)
    problems = []
    configs: dict[int, dict] = {}
    for i, t in enumerate(mopd.teachers):
        where = f"`algorithm.teachers[{i}]` (teacher {t.name!r})"
        cfg_path = os.path.join(t.path, "config.json")
        if not os.path.isfile(cfg_path):
            problems.append(f"{where}: {t.path!r} is not a model folder (no config.json); train the teacher "
                            "(scripts/toy_teachers.sh for the toy ones) or fix `path`")
            continue
        if not glob.glob(os.path.join(t.path, "*.safetensors")):
            problems.append(f"{where}: {t.path!r} has no *.safetensors weights; save the model with "
                            "safe_serialization=True")
            continue
        cfg = _read_json(cfg_path)
        if vocab_size(cfg) != vocab_size(student_cfg):
            problems.append(f"{where}: vocabulary size {vocab_size(cfg)} differs from the student's "
                            f"{vocab_size(student_cfg)} ({student_dir}); MOPD compares log-probs of the same "
                            "token ids, so the teacher must use the student's tokenizer and vocabulary")
            continue
        try:
            vocab = tokenizer_fingerprint(t.path)
        except TeacherConfigError as err:
            problems.append(f"{where}: {err}")
            continue
        if vocab != student_vocab:
            differ = sorted(set(vocab.items()) ^ set(student_vocab.items()))[:3]
            problems.append(f"{where}: its tokenizer differs from the student's (e.g. {differ}); the same ids would "
                            "mean different tokens. Use a teacher trained with the student's tokenizer")
            continue
        configs[i] = cfg
        if mopd.top_k > int(vocab_size(cfg) or mopd.top_k):
            problems.append(f"{where}: algorithm.top_k = {mopd.top_k} exceeds the vocabulary ({vocab_size(cfg)})")
    if not problems:
        groups = teacher_groups(mopd.teachers)
        if len(groups) > mopd.resident_engines:
            first = configs[groups[0][0]]
            described = "; ".join(
                f"[{', '.join(mopd.teachers[i].name for i in group)}] "
                f"({', '.join(configs[group[0]].get('architectures') or ['?'])}"
                + (f"; differs from the first in {', '.join(_config_differences(first, configs[group[0]])[:4])}"
                   if k else "") + ")"
                for k, group in enumerate(groups))
            problems.append(f"the teachers have {len(groups)} architectures ({described}); weights are swapped only "
                            f"between teachers of one architecture, so each needs its own engine, but "
                            f"algorithm.resident_engines = {mopd.resident_engines}. Set algorithm.resident_engines: "
                            f"{len(groups)} (or more)")
    if problems:
        raise TeacherConfigError("MOPD teachers are not usable:\n  - " + "\n  - ".join(problems))


def check_teachers_see_media(teachers, rows: list[dict], row_teacher: list[int], what: str) -> None:
    """Rows with images or videos must be routed to vision-language teachers: a text-only teacher cannot score
    them with their media (and without it would score a different question). All offenders in one error."""
    offending: dict[int, tuple[collections.Counter, str]] = {}
    text_only = {}
    for i, (row, t) in enumerate(zip(rows, row_teacher)):
        if row_modality(row) == "text":
            continue
        if t not in text_only:
            text_only[t] = not is_vision_language(_read_json(os.path.join(teachers[t].path, "config.json")))
        if text_only[t]:
            sources, first = offending.setdefault(t, (collections.Counter(), f"{what} row {i + 1}"))
            sources[str(row.get("data_source"))] += 1
    if offending:
        lines = [f"teacher {teachers[t].name!r} ({teachers[t].path}) is a text-only model but is routed "
                 f"{sum(sources.values())} {what} rows with images or videos (data_source "
                 f"{', '.join(f'{s!r} x{n}' for s, n in sorted(sources.items()))}; first: {first})"
                 for t, (sources, first) in sorted(offending.items())]
        raise TeacherConfigError("MOPD teachers cannot see these rows' media:\n  - " + "\n  - ".join(lines)
                                 + "\nRoute rows with media to a vision-language teacher (algorithm.teachers[*]."
                                 "labels, or route_key: modality), or make this teacher a vision-language model")
