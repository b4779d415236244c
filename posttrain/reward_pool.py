"""Former home of the reward runner, kept so existing imports work: everything lives in
`posttrain.rewards_runner` (one runner, one set of failure rules, for runs and `posttrain score`)."""
from posttrain.rewards_runner import (RewardFn, check_rewards_load, failing_rewards, prepare_reward_servers,  # noqa: F401
                                      release_reward_servers, reward_fns_from_recipe, reward_metrics, score_batch)
