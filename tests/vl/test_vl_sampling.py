"""A vision-language policy never samples its media placeholders: a sampled <|image_pad|> would be taken for an
image slot by the trainer's model ("Image features and image tokens do not match") though the engine embedded it
as text. Seen in a vl-quickstart run; the engine now gives those ids a −100 logit bias."""
import os

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.integration]


def test_media_tokens_are_never_sampled():
    from posttrain.rollout.engine import RolloutEngine, media_token_bias

    model = os.path.join(REPO, "posttrain", "toy", "assets", "toy-vl")
    bias = media_token_bias(model)
    assert bias and len(bias) == 4 and all(v == -100.0 for v in bias.values())
    assert media_token_bias(os.path.join(REPO, "posttrain", "toy", "assets", "toy-base")) is None   # text: untouched
    engine = RolloutEngine(model)
    out = engine.generate([[1, 2, 3, 4]] * 8, n=8, temperature=1.5, top_p=1.0, max_tokens=64, seeds=list(range(8)))
    sampled = [t for group in out for s in group for t in s["token_ids"]]
    assert len(sampled) > 500 and not set(sampled) & set(bias)
