"""Routing: every sample goes to exactly ONE teacher, chosen by a field of its dataset row.

The field is `algorithm.route_key` (default `data_source`; a dotted path such as `extra_info.domain` reaches into
nested objects). `route_key: modality` routes by the row's media instead: `video` (a row with videos), `image`
(with images), `text` (neither), so text-only and vision-language teachers can split one dataset. A value no teacher serves is an error, never a silent default, and it is found at start-up by
scanning the whole dataset (`check_dataset_routing`), not hundreds of steps in. Teachers are never averaged.
Imports nothing heavy, so `posttrain validate` can run it.
"""
from __future__ import annotations

import collections

from posttrain.config import RecipeError
from typing import Any, Sequence


class RoutingError(RecipeError):
    """A row whose routing label no teacher serves, or a row without the routing field."""


MODALITY = "modality"
MODALITY_LABELS = ("image", "video", "text")


def row_modality(row: dict) -> str:
    """`video` for a row with videos, `image` for one with images, else `text`."""
    return "video" if row.get("videos") else "image" if row.get("images") else "text"


def route_value(row: dict, route_key: str) -> Any:
    """The row's routing label: its modality for route_key "modality", else `row[a][b]...` for route_key "a.b...".
    Raises KeyError if a part is missing."""
    if route_key == MODALITY:
        return row_modality(row)
    node: Any = row
    for part in route_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(part)
        node = node[part]
    return node


class TeacherRouter:
    """label → teacher index, from the recipe's `algorithm.teachers[*].labels` (each label belongs to one teacher)."""

    def __init__(self, teachers: Sequence, route_key: str = "data_source"):
        self.route_key = route_key
        self.names = [t.name for t in teachers]
        self.label_to_teacher: dict[str, int] = {}
        for index, teacher in enumerate(teachers):
            for label in teacher.labels:
                if label in self.label_to_teacher:
                    other = self.names[self.label_to_teacher[label]]
                    raise RoutingError(f"routing label {label!r} is served by both teacher {other!r} and "
                                       f"{teacher.name!r}; each label must route to exactly one teacher")
                self.label_to_teacher[label] = index

    def route(self, row: dict, where: str = "row") -> int:
        """Index (in the recipe's teacher list) of the one teacher that scores this row."""
        try:
            label = route_value(row, self.route_key)
        except KeyError:
            raise RoutingError(f"{where} has no `{self.route_key}` field (algorithm.route_key); add it to the row or "
                               "set algorithm.route_key to the field that names the row's domain") from None
        index = self.label_to_teacher.get(str(label)) if isinstance(label, (str, int)) else None
        if index is None:
            raise RoutingError(self._unknown_message({str(label): (1, where)}))
        return index

    def route_rows(self, rows: Sequence[dict], what: str = "dataset") -> list[int]:
        """Teacher index of every row; ALL unknown labels are reported in one error (with counts and a first row)."""
        indices: list[int] = []
        unknown: dict[str, tuple[int, str]] = {}
        for i, row in enumerate(rows):
            try:
                label = route_value(row, self.route_key)
            except KeyError:
                raise RoutingError(f"{what} row {i + 1} has no `{self.route_key}` field (algorithm.route_key); add it "
                                   "or set algorithm.route_key to the field that names the row's domain") from None
            index = self.label_to_teacher.get(str(label))
            if index is None:
                count, first = unknown.get(str(label), (0, f"{what} row {i + 1}"))
                unknown[str(label)] = (count + 1, first)
                index = -1
            indices.append(index)
        if unknown:
            raise RoutingError(self._unknown_message(unknown))
        return indices

    def _unknown_message(self, unknown: dict[str, tuple[int, str]]) -> str:
        listed = "; ".join(f"{label!r} ({count} row{'s' * (count > 1)}, first: {first})"
                           for label, (count, first) in sorted(unknown.items()))
        served = ", ".join(f"{self.names[i]} ← {label!r}" for label, i in sorted(self.label_to_teacher.items()))
        return (f"no teacher serves {self.route_key} = {listed}. Teachers: {served}. Add the label to the `labels` "
                "of the teacher that should score these rows (algorithm.teachers[*].labels), or remove the rows; "
                "MOPD never falls back to a default teacher")


def check_dataset_routing(recipe, rows_by_split: dict[str, list[dict]]) -> dict[str, collections.Counter]:
    """Route every row of every split (start-up check). Returns {split: Counter(teacher name → rows)}."""
    router = TeacherRouter(recipe.algorithm.teachers, recipe.algorithm.route_key)
    out = {}
    for split, rows in rows_by_split.items():
        out[split] = collections.Counter(router.names[i] for i in router.route_rows(rows, split))
    return out
