"""An OpenRLHF reward function file: ``--remote_rm_url examples/openrlhf_reward_func.py`` (``--label_key`` for references).

OpenRLHF calls ``reward_func(queries, prompts, labels)``; each query is its prompt followed by the response.
With labels (reference answers) each reward is pairwise against its label; without, responses to the same
prompt are judged against one another (win rate). ``extra_logs["abstain"]`` flags the rewards that no
verdict stood behind (they get the neutral 0.5; OpenRLHF trains on them and logs the abstain rate). Or serve it: ``reflectagent serve-rm --program genrm-prob`` and
``--remote_rm_url http://127.0.0.1:5000/get_reward``.

Run (a demo call): .venv/bin/python examples/openrlhf_reward_func.py
"""

from reflectagent.rl import openrlhf_reward_func

reward_func = openrlhf_reward_func("genrm-prob")

if __name__ == "__main__":
    prompt = "What is the capital of France?\n"
    print(reward_func([prompt + "Paris.", prompt + "Berlin."], [prompt, prompt], []))
