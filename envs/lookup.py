"""`lookup`: questions whose answers live only in a local document store, reached by a `search` tool.

The store is a list of one-sentence documents: a JSONL file (`documents_path`, one {"text": ...} per line) or,
by default, the toy store of made-up facts ("The capital of Zorbia is Quellin.") generated from `store_seed`,
so no model can know the answers without searching. `search(query)` ranks documents by how many of the query's
words they contain (ties: store order) and returns the top `k`. Final answer `Answer: TEXT`, exact match.
"""
from __future__ import annotations

import functools
import json
import random
import re

from envs.base import ToolEnv, final_answer_text
from envs.tools import tool

_SYLLABLES = ["zor", "bia", "quel", "lin", "tam", "sa", "vor", "ka", "mir", "don", "pel", "ri", "sul", "ten",
              "gav", "ro", "nix", "ula", "bre", "th", "os", "kel", "dra", "mo", "fen", "wy", "lor", "ik"]
_WORD = re.compile(r"[a-z0-9]+")


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


@functools.lru_cache(maxsize=8)
def toy_facts(store_seed: int = 0, countries: int = 300) -> tuple[tuple[str, str, str], ...]:
    """(country, capital, river) triples with made-up, distinct names, reproducible from store_seed."""
    rng, seen, facts = random.Random(f"lookup-store-{store_seed}"), set(), []
    while len(facts) < countries:
        country, capital, river = _name(rng, 3), _name(rng, 2), _name(rng, 2)
        if len({country, capital, river} | seen) == len(seen) + 3:
            seen |= {country, capital, river}
            facts.append((country, capital, river))
    return tuple(facts)


@functools.lru_cache(maxsize=8)
def toy_documents(store_seed: int = 0) -> tuple[str, ...]:
    docs = []
    for country, capital, river in toy_facts(store_seed):
        docs += [f"The capital of {country} is {capital}.", f"The river {river} flows through {country}."]
    return tuple(docs)


@functools.lru_cache(maxsize=8)
def _load_documents(path: str) -> tuple[str, ...]:
    with open(path) as fh:
        return tuple(json.loads(line)["text"] for line in fh if line.strip())


def search_documents(documents: tuple[str, ...], query: str, k: int) -> list[str]:
    words = set(_WORD.findall(query.lower()))
    scored = [(-len(words & set(_WORD.findall(doc.lower()))), i) for i, doc in enumerate(documents)]
    return [documents[i] for score, i in sorted(scored)[:k] if score < 0]


class LookupEnv(ToolEnv):
    def __init__(self, row: dict, *, store_seed: int = 0, documents_path: str | None = None, k: int = 2,
                 **kwargs):
        super().__init__(row, **kwargs)
        self.documents = _load_documents(documents_path) if documents_path else toy_documents(store_seed)
        self.k = k

    @tool
    def search(self, query: str) -> str:
        """Search the document store; returns the best matching documents, one per line.

        Args:
            query: words to look for
        """
        found = search_documents(self.documents, query, self.k)
        return "\n".join(found) if found else "No documents found."

    def final_reward(self, answer: str) -> float:
        return float(final_answer_text(answer) == str(self.row["reward_model"]["ground_truth"]).strip())
