"""Start-up checks of the teachers against the student, without loading torch or an engine.

MOPD compares teacher and student log-probs of the SAME token ids, so every teacher must use the student's
tokenizer and vocabulary; and teachers that time-share an engine by swapping weights must share its
architecture. Each problem is an error naming the teacher, the mismatch and the fix.
"""
from __future__ import annotations

import glob
import json
import os

from posttrain.config import RecipeError

# Fields that must agree for one engine to take another teacher's weights in memory.
ARCH_FIELDS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim", "vocab_size", "tie_word_embeddings")


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


def check_teachers(recipe) -> None:
    """Paths, weights, vocabulary, tokenizer, architecture and k of every teacher; raises TeacherConfigError."""
    mopd = recipe.algorithm
    student_dir = recipe.model.path
    student_cfg = _read_json(os.path.join(student_dir, "config.json"))
    student_vocab = tokenizer_fingerprint(student_dir)
    problems = []
    reference_arch: tuple[str, dict] | None = None
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
        if cfg.get("vocab_size") != student_cfg.get("vocab_size"):
            problems.append(f"{where}: vocabulary size {cfg.get('vocab_size')} differs from the student's "
                            f"{student_cfg.get('vocab_size')} ({student_dir}); MOPD compares log-probs of the same "
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
        arch = {k: cfg.get(k) for k in ARCH_FIELDS}
        if reference_arch is None:
            reference_arch = (t.name, arch)
        elif arch != reference_arch[1]:
            diff = {k: (reference_arch[1][k], arch[k]) for k in ARCH_FIELDS if arch[k] != reference_arch[1][k]}
            problems.append(f"{where}: architecture differs from teacher {reference_arch[0]!r} ({diff}); teachers "
                            "time-share engines by swapping weights, which needs one architecture. Put teachers of "
                            "another architecture in a separate MOPD stage")
        if mopd.top_k > int(cfg.get("vocab_size", mopd.top_k)):
            problems.append(f"{where}: algorithm.top_k = {mopd.top_k} exceeds the vocabulary ({cfg.get('vocab_size')})")
    if problems:
        raise TeacherConfigError("MOPD teachers are not usable:\n  - " + "\n  - ".join(problems))
