"""The fine-tuning loop in one call: pairs -> traces -> data -> train -> serve -> eval -> report.

Each stage leaves its output under ``output_dir`` and is skipped when run again, and every
LM step goes through the judgment cache, so an interrupted loop resumes where it stopped.
Servers run one at a time and never beside training: on a small CPU machine they would
fight over the same cores. The report compares the base model, the Bradley-Terry baseline,
response-preference-only training and unified (ReflectRM) training, each generative model
under every inference program, on held-out pairs of the training sources and on sources
never trained on. Pair choice is :mod:`.selection`, the report :mod:`.loop_report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import closing, contextmanager
from pathlib import Path

from reflectagent.calling.backends import resolve_backend
from reflectagent.calling.config import EMBEDDED, BackendConfig, Settings, load_settings
from reflectagent.eval.runner import EvalRun, RunResult, run_eval
from reflectagent.finetune.loop_config import LoopConfig
from reflectagent.finetune.loop_report import write_loop_report
from reflectagent.finetune.selection import choose_pairs
from reflectagent.programs import named_program
from reflectagent.records.pairs import Pair, parse_pair
from reflectagent.serving.embedded import serving
from reflectagent.serving.models import default_dtype, prepare_model

logger = logging.getLogger(__name__)


class Stages:
    """Wall time per stage, kept in ``stages.json``; a stage run again (eval after an interruption, mostly
    from the cache) is recorded beside its first time, not over it."""

    def __init__(self, folder: Path):
        self.path = folder / "stages.json"
        self.times: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    @contextmanager
    def stage(self, name: str):
        logger.info("stage %s", name)
        started = time.perf_counter()
        yield
        runs = 1 + sum(1 for key in self.times if key == name or key.startswith(f"{name} (run "))
        self.times[name if runs == 1 else f"{name} (run {runs})"] = round(time.perf_counter() - started, 1)
        self.path.write_text(json.dumps(self.times, indent=1))


def lm_for(name: str, config: BackendConfig):
    """The LM of one backend config that is in no settings file (a model the loop serves)."""
    return resolve_backend(name, Settings(backends={name: config}))


class Loop:
    """:meth:`run` does it all; ``pairs``, ``data``, ``train``, ``train_dpo``, ``train_bradley_terry`` and
    ``evaluate`` can also be called alone. Each returns what it made, or finds it made already."""

    def __init__(self, config: LoopConfig, settings: Settings | None = None, progress: bool = True):
        self.config = config
        self.settings = settings or load_settings()
        self.progress = progress
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages = Stages(self.out)
        (self.out / "loop_config.json").write_text(json.dumps(config.to_dict(), indent=1))

    # ---- stages -------------------------------------------------------------------------------

    def pairs(self) -> dict[str, list[Pair]]:
        path = self.out / "pairs.json"
        if not path.exists():
            with self.stages.stage("pairs"):
                chosen = choose_pairs(self.config)
                path.write_text(json.dumps({k: [p.to_dict() for p in v] for k, v in chosen.items()}))
        return {k: [parse_pair(d) for d in v] for k, v in json.loads(path.read_text()).items()}

    def data(self) -> Path:
        """Teacher traces on the train pairs, then the unified data (and STaR-DPO triples)."""
        folder = self.out / "data"
        if (folder / "data_card.json").exists():
            return folder
        from reflectagent.finetune.traces import distil

        train = self.pairs()["train"]
        name, teacher = self.settings.backend(self.config.teacher_backend)
        with self.stages.stage("traces+data"), self._teacher_server(teacher) as url:
            served = {"api_base": url, "context_tokens": self.config.max_model_len}  # the server this stage started
            settings = self._with(**{name: teacher.model_copy(update=served) if url else teacher})
            distil(
                train,
                name,
                settings,
                folder,
                self.config.data,
                samples=self.config.samples,
                temperature=self.config.temperature,
                concurrency=self.config.concurrency,
                progress=self.progress,
            )
        return folder

    def train(self, kind: str) -> Path:
        """LoRA SFT on ``response`` rows only or on the ``unified`` mix; returns the adapter."""
        import datasets

        from reflectagent.finetune.sft_trainer import train_sft

        run = self.out / "models" / kind
        if (run / "run_card.json").exists():
            return run / "adapter"
        data = self.data() / "unified"
        if kind == "response":
            only = datasets.load_from_disk(str(data)).filter(lambda row: row["kind"] == "response")
            data = self.out / "data" / "response_only"
            only.save_to_disk(str(data))
        job = dataclasses.replace(
            self.config.sft,
            base_model=self.config.base_model,
            data=str(data),
            output_dir=str(run),
            seed=self.config.seed,
        )
        with self.stages.stage(f"train {kind}"):
            return train_sft(job)

    def train_dpo(self) -> Path | None:
        from reflectagent.finetune.dpo import DPOJobConfig, train_dpo

        run = self.out / "models" / "dpo"
        if (run / "run_card.json").exists():
            return run / "merged"
        dpo_data = self.data() / "dpo"
        if not dpo_data.exists():
            logger.warning("no STaR-DPO triples (no order had a right and a wrong analysis): skipping DPO")
            return None
        sft = self.config.sft  # the DPO adapter sits on the SFT model: same modules, rank, length and hardware settings
        job = DPOJobConfig(
            base_model=self.config.base_model,
            data=str(dpo_data),
            sft_adapter=str(self.train("unified")),
            output_dir=str(run),
            seed=self.config.seed,
            threads=sft.threads,
            lora_r=sft.lora_r,
            lora_alpha=sft.lora_alpha,
            target_modules=sft.target_modules,
            bf16=sft.bf16,
            max_length=sft.max_length,
        )
        with self.stages.stage("train dpo"):
            return train_dpo(job)

    def train_bradley_terry(self) -> Path:
        from reflectagent.finetune.reward import train_reward

        run = self.out / "models" / "bradley-terry"
        if (run / "run_card.json").exists():
            return run / "adapter"
        job = dataclasses.replace(
            self.config.reward, base_model=self.config.base_model, output_dir=str(run), seed=self.config.seed
        )
        with self.stages.stage("train bradley-terry"):
            return train_reward(job, self.pairs()["train"])

    def evaluate(self, adapters: dict[str, Path], reward_adapter: Path | None) -> dict[str, list[RunResult]]:
        """Every generative model under every program (and some unconstrained), plus the baseline."""
        pairs = self.pairs()
        sets = {"dev": pairs["dev"], "unseen": pairs["unseen"]}
        results: dict[str, list[RunResult]] = {name: [] for name in sets}

        def judge(runs: list[EvalRun], free: list[EvalRun], concurrency: int = self.config.concurrency) -> None:
            for name, eval_pairs in sets.items():
                for chosen, subset in ((runs, eval_pairs), (free, eval_pairs[: self.config.unconstrained_pairs])):
                    if chosen:
                        results[name] += run_eval(subset, chosen, concurrency=concurrency, progress=self.progress)

        with self.stages.stage("eval"), closing(self._servers(adapters)) as servers:
            for models, url, loras, folder in servers:
                judge(*self._runs(models, url, loras, folder))
            if reward_adapter is not None:
                from reflectagent.finetune.reward import RewardModelJudge

                baseline = RewardModelJudge(
                    reward_adapter, self.config.base_model, max_length=self.config.reward.max_length
                )
                judge([EvalRun("bradley-terry", "bradley-terry", baseline)], [], concurrency=1)
        return results

    # ---- the whole loop -----------------------------------------------------------------------

    def run(self) -> Path:
        pairs = self.pairs()
        self.data()
        adapters = {kind: self.train(kind) for kind in ("response", "unified")}
        if self.config.dpo:
            dpo = self.train_dpo()
            if dpo is not None:
                adapters["dpo"] = dpo
        reward = self.train_bradley_terry() if self.config.bradley_terry else None
        results = self.evaluate(adapters, reward)
        set_meta = {
            name: {
                "data": self.config.files("train_data" if name == "dev" else "unseen_data"),
                "pairs": len(pairs[name]),
                "split": name,
                "seed": self.config.seed,
            }
            for name in results
        }
        meta = {"pairs": {k: len(v) for k, v in pairs.items()}, "seed": self.config.seed}
        return write_loop_report(self.out, results, self.stages.times, set_meta, meta)

    # ---- helpers ------------------------------------------------------------------------------

    def _with(self, **backends: BackendConfig) -> Settings:
        """The loop's settings, every field kept (the cache's place and its Redis among them), with ``backends`` added."""
        return self.settings.model_copy(update={"backends": {**self.settings.backends, **backends}})

    def _servers(self, adapters: dict[str, Path]):
        """(models, url, loras, model folder) for each server eval needs, started one after another."""
        from reflectagent.finetune.export import merge_adapter

        base = prepare_model(self.config.base_model)
        logs = self.out / "logs"
        if self.config.serve == "lora":
            if "dpo" in adapters:
                logger.warning("the DPO model is served merged only (its adapter sits on the SFT weights)")
            loras = {k: str(v) for k, v in adapters.items() if k != "dpo"}
            with serving(
                base,
                loras,
                log_path=logs / "vllm-eval.log",
                max_model_len=self.config.max_model_len,
                max_lora_rank=self.config.sft.lora_r,
            ) as url:
                yield ["base", *loras], url, loras, base
            return
        for model in ("base", *adapters):
            folder = base
            if model != "base":
                folder = self.out / "models" / model / "merged"
                if not (folder / "config.json").exists():
                    merge_adapter(adapters[model], folder, self.config.base_model)
            # every model in the base's dtype: merged folders carry no preset, and "before vs after" must not mix precisions
            with serving(
                folder,
                log_path=logs / f"vllm-{model}.log",
                max_model_len=self.config.max_model_len,
                dtype=default_dtype(base),
            ) as url:
                yield [model], url, {}, folder

    def _runs(
        self, models: list[str], url: str, loras: dict[str, str], folder: Path
    ) -> tuple[list[EvalRun], list[EvalRun]]:
        """Every program on each served model, and GenRM without constrained decoding where asked."""
        programs = [p for p in self.config.programs.split(",") if p]
        unconstrained = {m for m in self.config.unconstrained.split(",") if m}
        _, embedded = self.settings.backend(EMBEDDED)
        runs, free = [], []
        for model in models:
            config = BackendConfig(
                model=EMBEDDED,
                api_base=url,
                model_path=str(folder),
                lora=loras,
                adapter=model if model in loras else None,
                context_tokens=self.config.max_model_len,
                context_chars=self.config.data.context_chars or embedded.context_chars,
            )
            lm = lm_for(model, config)
            runs += [EvalRun(program, model, named_program(program), lm) for program in programs]
            genrm = next((p for p in programs if p.startswith("genrm")), None)
            if model in unconstrained and genrm:  # the parse-rate check: GenRM only, on a subset
                loose = config.model_copy(
                    update={"constrained": False, "logprobs": True, "max_tokens": self.config.unconstrained_max_tokens}
                )
                free.append(EvalRun(genrm, f"{model} (free)", named_program(genrm), lm_for(model, loose)))
        return runs, free

    @contextmanager
    def _teacher_server(self, teacher: BackendConfig):
        """A server for an embedded teacher (stopped before training starts); else nothing."""
        if teacher.model != EMBEDDED or teacher.api_base:
            yield None
            return
        folder = prepare_model(teacher.model_path or self.config.base_model)
        with serving(
            folder,
            log_path=self.out / "logs" / "vllm-teacher.log",
            max_model_len=self.config.max_model_len,
            dtype=teacher.dtype,
        ) as url:  # the dtype its cache identity names
            yield url
