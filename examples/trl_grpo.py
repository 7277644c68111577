"""TRL's GRPOTrainer with a reflectagent judge as the reward: two steps on CPU, SmolLM2 as the policy.

The judge (GenRM, verdict probabilities, on the embedded vLLM server) compares each prompt's completions
with one another; TRL logs the reward as ``rewards/reflectagent_genrm_prob/mean``. A ``reference`` column
would make every reward pairwise against it instead: ``trl_reward(..., reference_column="reference")``.

Run: .venv/bin/python examples/trl_grpo.py      (a few minutes on 2 CPU cores)
"""

import tempfile

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from reflectagent.models import prepare_model
from reflectagent.rl import trl_reward

reward = trl_reward("genrm-prob", "embedded")  # or asynchronous=True for an `async def` TRL gathers
prompts = Dataset.from_list(
    [{"prompt": [{"role": "user", "content": q}]} for q in ("What is the capital of France?", "Name a prime number.")]
)
config = GRPOConfig(
    output_dir=tempfile.mkdtemp(),
    max_steps=2,
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=32,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
)
trainer = GRPOTrainer(model=str(prepare_model()), reward_funcs=[reward], args=config, train_dataset=prompts)
trainer.train()
for row in trainer.state.log_history:
    if f"rewards/{reward.__name__}/mean" in row:
        print(f"step {row['step']}: reward mean {row[f'rewards/{reward.__name__}/mean']:.3f}")
