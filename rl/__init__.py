"""Any reflectagent judge as a reward for RL trainers (``reflectagent.rl``).

:class:`Rewarder` turns judgments into rewards: a response against a reference answer (the
probability that it is better, where the backend gives one, else the vote), or each response of a
group sharing a prompt against the others (win rate or Bradley-Terry over a round robin). The
adapters give TRL, verl and OpenRLHF the function shapes they call; ``reflectagent serve-rm``
serves the same rewards over HTTP.
"""

from reflectagent.rl.adapters import openrlhf_reward_func, trl_reward, verl_compute_score
from reflectagent.rl.rewards import NO_VERDICT_REWARD, Reward, Rewarder

__all__ = ["NO_VERDICT_REWARD", "Reward", "Rewarder", "openrlhf_reward_func", "trl_reward", "verl_compute_score"]
