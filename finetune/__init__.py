"""Training data from judge traces, and LoRA fine-tuning (``reflectagent.finetune``).

    traces = collect_traces(train_pairs)                 # a teacher program, any backend
    data = build_unified_data(traces, DataConfig())      # STaR rows + reflection rows, 4:1, split by pair
    data.save("runs/data")                               # Hugging Face datasets, chat messages
    adapter = train_sft(SFTJobConfig(data="runs/data/unified"))   # LoRA, served by `reflectagent serve --lora`
"""

from reflectagent.finetune.data import DataConfig, Trace, UnifiedData, build_unified_data
from reflectagent.finetune.rationalize import Rationalizer
from reflectagent.finetune.reward import RewardJobConfig, RewardModelJudge, train_reward
from reflectagent.finetune.sft_config import SFTJobConfig
from reflectagent.finetune.sft_trainer import train_sft
from reflectagent.finetune.traces import collect_traces

__all__ = ["DataConfig", "Rationalizer", "RewardJobConfig", "RewardModelJudge", "SFTJobConfig", "Trace", "UnifiedData",
           "build_unified_data", "collect_traces", "train_reward", "train_sft"]
