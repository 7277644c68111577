"""Training data from judge traces, and LoRA fine-tuning (``reflectagent.finetune``).

traces = collect_traces(train_pairs)                 # a teacher program, any backend
data = build_unified_data(traces, DataConfig())      # STaR rows + reflection rows, 4:1, split by pair
data.save("runs/data")                               # Hugging Face datasets, chat messages
build_verdict_data(labelled_pairs).save("runs/verdict")  # or the verdict alone, from labels: no LM call
teacher_data(read_teacher(path)[0], "student", settings, "runs/rationale")  # or a teacher file's rationales: no LM call
build_mined_data(mine_cache(train_pairs, judge, lm, cache))   # or the judge's own doubts, from the cache: no LM call
adapter = train_sft(SFTJobConfig(data="runs/data/unified"))   # LoRA, served by `reflectagent serve --lora`
Loop(load_loop_config("loop.yaml")).run()            # all of it, with the eval report (`finetune run`)
"""

from reflectagent.finetune.data import DataConfig, Trace, UnifiedData, build_unified_data, build_verdict_data
from reflectagent.finetune.dpo import DPOJobConfig, train_dpo
from reflectagent.finetune.export import merge_adapter
from reflectagent.finetune.loop import Loop
from reflectagent.finetune.loop_config import LoopConfig, load_loop_config
from reflectagent.finetune.mining import Mining, build_mined_data, mine, mine_cache
from reflectagent.finetune.rationalize import Rationalizer
from reflectagent.finetune.reward import RewardJobConfig, RewardModelJudge, train_reward
from reflectagent.finetune.sft_config import SFTJobConfig
from reflectagent.finetune.sft_trainer import train_sft
from reflectagent.finetune.traces import collect_traces, distil, distil_file, label_data, teacher_data, teacher_traces

__all__ = [
    "DPOJobConfig",
    "DataConfig",
    "Loop",
    "LoopConfig",
    "Rationalizer",
    "RewardJobConfig",
    "RewardModelJudge",
    "SFTJobConfig",
    "Trace",
    "UnifiedData",
    "Mining",
    "build_mined_data",
    "build_unified_data",
    "build_verdict_data",
    "mine",
    "mine_cache",
    "collect_traces",
    "distil",
    "distil_file",
    "label_data",
    "teacher_data",
    "teacher_traces",
    "load_loop_config",
    "merge_adapter",
    "train_dpo",
    "train_reward",
    "train_sft",
]
