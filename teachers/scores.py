"""The teacher's answer for a batch of student sequences, in a compact binary form.

For every response token of every sequence: the teacher's top-k token ids and log-probs at that position (the
distribution over that token given everything before it) and the teacher's log-prob of the token the student
actually sampled. Stored as flat numpy arrays over all response tokens of the batch plus per-sequence offsets:

    topk_ids        int32   [R, k]     R = Σ_i |response_i|
    topk_logprobs   float32 [R, k]     sorted best first (rank 1 .. k)
    token_logprobs  float32 [R]        log π_T(y_t) of the sampled token
    offsets         int64   [N + 1]    sequence i owns rows offsets[i] : offsets[i+1]

8·k + 4 bytes per token (132 B at k = 16), never JSON lists of floats; numpy arrays travel through Ray's object
store without pickling their contents.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class TeacherScores:
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray
    offsets: np.ndarray

    def __post_init__(self):
        rows = int(self.offsets[-1]) if len(self.offsets) else 0
        if (self.topk_ids.dtype != np.int32 or self.topk_logprobs.dtype != np.float32
                or self.token_logprobs.dtype != np.float32 or self.offsets.dtype != np.int64):
            raise TypeError("TeacherScores arrays must be int32 ids, float32 log-probs and int64 offsets")
        if self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[0] != rows \
                or self.token_logprobs.shape != (rows,):
            raise ValueError(f"inconsistent TeacherScores shapes: ids {self.topk_ids.shape}, logprobs "
                             f"{self.topk_logprobs.shape}, token {self.token_logprobs.shape}, {rows} rows by offsets")

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.topk_ids.nbytes + self.topk_logprobs.nbytes + self.token_logprobs.nbytes + self.offsets.nbytes)

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(topk_ids [R_i,k], topk_logprobs [R_i,k], token_logprobs [R_i]) of sequence i (views, no copy)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.topk_ids[a:b], self.topk_logprobs[a:b], self.token_logprobs[a:b]

    @staticmethod
    def from_sequences(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> "TeacherScores":
        lengths = [len(p[2]) for p in parts]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not parts:
            return TeacherScores(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32),
                                 offsets)
        return TeacherScores(np.concatenate([p[0] for p in parts]).astype(np.int32, copy=False),
                             np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False),
                             np.concatenate([p[2] for p in parts]).astype(np.float32, copy=False), offsets)

    @staticmethod
    def gather(batches: Sequence["TeacherScores"], order: Sequence[tuple[int, int]], k: int) -> "TeacherScores":
        """Reassemble one batch from per-teacher batches: order[j] = (batch index, sequence index) of sequence j."""
        return TeacherScores.from_sequences([batches[b].sequence(i) for b, i in order], k)


def padded(per_sequence: Sequence[np.ndarray], length: int, fill=0) -> np.ndarray:
    """Stack ragged [R_i, ...] arrays into [N, length, ...], padding with `fill`."""
    first = per_sequence[0]
    out = np.full((len(per_sequence), length, *first.shape[1:]), fill, dtype=first.dtype)
    for i, a in enumerate(per_sequence):
        out[i, :len(a)] = a
    return out
