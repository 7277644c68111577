"""The fine-tuning loop in one call: traces -> data -> train -> serve -> eval -> report.

Each stage leaves its output under ``output_dir`` and is skipped when run again, and every
LM step goes through the judgment cache, so an interrupted loop resumes where it stopped.
Servers run one at a time and never beside training: on a small CPU machine they would
fight over the same cores. The report compares the base model, the Bradley-Terry baseline,
response-preference-only training and unified (ReflectRM) training, each generative model
under every inference program, on held-out pairs of the training sources and on sources
never trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reflectagent.backends import EMBEDDED_SERVED_NAME, die_with_parent
from reflectagent.config import BackendConfig, Settings, load_settings
from reflectagent.eval.data import load_benchmark, split_pairs, stable_fraction
from reflectagent.eval.report import format_ci, format_value, metric_values, write_report
from reflectagent.eval.runner import RunResult, run_eval
from reflectagent.finetune.loop_config import LoopConfig
from reflectagent.pairs import Pair, parse_pair
from reflectagent.server import ServerSpec, VLLMServer

logger = logging.getLogger(__name__)
GENERATIVE = ("base", "response", "unified")


def usable(pair: Pair, max_chars: int) -> bool:
    return (pair.label in ("A", "B") and not pair.identical and bool(pair.response_a.strip())
            and bool(pair.response_b.strip()) and len(pair.prompt) + len(pair.response_a) + len(pair.response_b) <= max_chars)


def balanced(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """``n`` pairs taken in turn from each source, each source in a stable seeded order."""
    by_source: dict[str, list[Pair]] = {}
    for pair in sorted(pairs, key=lambda p: stable_fraction(str(seed), p.id)):
        by_source.setdefault(pair.source or "", []).append(pair)
    queues, chosen = [list(v) for _, v in sorted(by_source.items())], []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def choose_pairs(config: LoopConfig) -> dict[str, list[Pair]]:
    """Disjoint train / dev (held out, same sources) / unseen (other sources) pairs."""
    def load(files):
        pairs = []
        for name in files:
            loaded, bad = load_benchmark(name)
            if bad:
                logger.warning("%s: skipped %d malformed lines", name, len(bad))
            pairs += [p for p in loaded if usable(p, config.max_pair_chars)]
        return pairs

    candidates = load(config.files("train_data"))
    known = balanced(candidates, config.train_pairs + config.dev_pairs, config.seed)
    share = config.train_pairs / max(config.train_pairs + config.dev_pairs, 1)
    split = split_pairs(known, fractions=(share, 1 - share, 0.0), seed=config.seed)
    unseen = balanced(load(config.files("unseen_data")), config.unseen_pairs, config.seed)
    overlap = {p.id for p in split["train"]} & {p.id for p in split["dev"] + unseen}
    if overlap:
        raise ValueError(f"{len(overlap)} pair ids are both in training and in evaluation: {sorted(overlap)[:5]}")
    logger.info("pairs: %d train, %d dev, %d unseen (training sources: %d usable pairs)", len(split["train"]), len(split["dev"]), len(unseen), len(candidates))
    return {"train": split["train"], "dev": split["dev"], "unseen": unseen}


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


@contextmanager
def serving(model_dir: str | Path, loras: dict[str, str], log: Path, max_lora_rank: int = 64, max_model_len: int = 2048):
    spec = ServerSpec(model_dir=str(model_dir), served_name=EMBEDDED_SERVED_NAME, loras=loras, max_lora_rank=max_lora_rank,
                      max_model_len=max_model_len)
    server = VLLMServer(spec, log_path=log)
    if threading.current_thread() is threading.main_thread():
        server.preexec = die_with_parent  # a killed loop leaves no server behind
    with server:
        yield server.url


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
            settings = self._with(**{name: teacher.model_copy(update={"api_base": url}) if url else teacher})
            distil(train, name, settings, folder, self.config.data, samples=self.config.samples,
                   temperature=self.config.temperature, concurrency=self.config.concurrency, progress=self.progress)
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
        job = dataclasses.replace(self.config.sft, base_model=self.config.base_model, data=str(data),
                                  output_dir=str(run), seed=self.config.seed)
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
        job = DPOJobConfig(base_model=self.config.base_model, data=str(dpo_data), sft_adapter=str(self.train("unified")),
                           output_dir=str(run), seed=self.config.seed, threads=self.config.sft.threads)
        with self.stages.stage("train dpo"):
            return train_dpo(job)

    def train_bradley_terry(self) -> Path:
        from reflectagent.finetune.reward import train_reward

        run = self.out / "models" / "bradley-terry"
        if (run / "run_card.json").exists():
            return run / "adapter"
        pairs = self.pairs()
        job = dataclasses.replace(self.config.reward, base_model=self.config.base_model, output_dir=str(run),
                                  seed=self.config.seed)
        with self.stages.stage("train bradley-terry"):
            return train_reward(job, pairs["train"])

    def evaluate(self, adapters: dict[str, Path], reward_adapter: Path | None) -> dict[str, list[RunResult]]:
        """Every generative model under every program (and some unconstrained), plus the baseline."""
        from reflectagent.finetune.export import merge_adapter
        from reflectagent.models import prepare_model

        pairs = self.pairs()
        sets = {"dev": pairs["dev"], "unseen": pairs["unseen"]}
        programs = [p for p in self.config.programs.split(",") if p]
        free = {m for m in self.config.unconstrained.split(",") if m}
        results: dict[str, list[RunResult]] = {name: [] for name in sets}
        base = prepare_model(self.config.base_model)
        _, embedded = self.settings.backend("embedded")
        context = self.config.data.context_chars or embedded.context_chars

        def backends_for(model: str, url: str, lora: dict[str, str], model_path: str | None) -> dict[str, BackendConfig]:
            common = {"model": "embedded", "api_base": url, "context_chars": context, "lora": lora,
                      "adapter": model if model in lora else None, "model_path": model_path}
            made = {model: BackendConfig(**common)}
            if model in free:
                made[f"{model} (free)"] = BackendConfig(**common, constrained=False, logprobs=True,
                                                        max_tokens=self.config.unconstrained_max_tokens)
            return made

        def run_sets(configs: dict[str, BackendConfig]):
            settings = self._with(**configs)
            for name, eval_pairs in sets.items():
                for back in configs:
                    progs, judged = programs, eval_pairs
                    if back.endswith("(free)"):  # the parse-rate check: GenRM only, on a subset
                        progs = [p for p in programs if p.startswith("genrm")][:1]
                        judged = eval_pairs[:self.config.unconstrained_pairs]
                    results[name] += run_eval(judged, progs, [back], settings=settings,
                                              concurrency=self.config.concurrency, progress=self.progress)

        with self.stages.stage("eval"):
            if self.config.serve == "lora":
                if "dpo" in adapters:
                    logger.warning("the DPO model is served merged only (its adapter sits on the SFT weights)")
                loras = {k: str(v) for k, v in adapters.items() if k != "dpo"}
                with serving(base, loras, self.out / "logs" / "vllm-eval.log", self.config.sft.lora_r,
                             self.config.max_model_len) as url:
                    configs = {}
                    for model in ("base", *loras):
                        configs.update(backends_for(model, url, loras, str(base)))
                    run_sets(configs)
            else:
                for model in ("base", *adapters):
                    folder = base
                    if model != "base":
                        folder = self.out / "models" / model / "merged"
                        if not (folder / "config.json").exists():
                            merge_adapter(adapters[model], folder, self.config.base_model)
                    with serving(folder, {}, self.out / "logs" / f"vllm-{model}.log", max_model_len=self.config.max_model_len) as url:
                        run_sets(backends_for(model, url, {}, str(folder)))
            if reward_adapter is not None:
                from reflectagent.finetune.reward import RewardModelJudge

                judge = RewardModelJudge(reward_adapter, self.config.base_model)
                settings = self._with(**{"bradley-terry": BackendConfig(model="embedded", api_base="http://unused/v1")})
                for name, eval_pairs in sets.items():
                    results[name] += run_eval(eval_pairs, {"bradley-terry": judge}, ["bradley-terry"], settings=settings,
                                              concurrency=1, progress=self.progress)
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
        meta = {"pairs": {k: len(v) for k, v in pairs.items()}, "seed": self.config.seed}
        for name, runs in results.items():
            write_report(runs, self.out / "eval" / name,
                         {"data": self.config.files("train_data" if name == "dev" else "unseen_data"),
                          "pairs": len(pairs[name]), "split": name, "seed": self.config.seed})
        report = self.out / "report.md"
        report.write_text(summary(results, self.stages.times, self._cards(), meta))
        (self.out / "summary.json").write_text(json.dumps({
            "stages_s": self.stages.times, "cards": self._cards(), "meta": meta,
            "results": {name: [{"program": r.program, "backend": r.backend, **metric_values(r.overall, r.run)} for r in runs]
                        for name, runs in results.items()},
        }, indent=1))
        return report

    # ---- helpers ------------------------------------------------------------------------------

    def _with(self, **backends: BackendConfig) -> Settings:
        return Settings(backends={**self.settings.backends, **backends}, cache_dir=self.settings.cache_dir,
                        cache=self.settings.cache, default_backend=self.settings.default_backend)

    @contextmanager
    def _teacher_server(self, teacher: BackendConfig):
        """A server for an embedded teacher (stopped before training starts); else nothing."""
        if teacher.model != "embedded" or teacher.api_base:
            yield None
            return
        from reflectagent.models import prepare_model

        folder = prepare_model(teacher.model_path or self.config.base_model)
        with serving(folder, {}, self.out / "logs" / "vllm-teacher.log", max_model_len=self.config.max_model_len) as url:
            yield url

    def _cards(self) -> dict[str, Any]:
        cards = {}
        for card in sorted((self.out / "models").glob("*/run_card.json")):
            data = json.loads(card.read_text())
            cards[card.parent.name] = {k: data.get(k) for k in
                                       ("train_rows", "train_pairs", "rows_by_kind", "steps", "seconds", "first_loss",
                                        "final_loss", "eval_loss")}
        data_card = self.out / "data" / "data_card.json"
        if data_card.exists():
            cards["data"] = json.loads(data_card.read_text())
        return cards


def summary(results: dict[str, list[RunResult]], stages: dict[str, float], cards: dict[str, Any], meta: dict[str, Any]) -> str:
    """The loop's report: one row per model x program, one column group per eval set."""
    labels = ("accuracy", "consistency", "parse failures", "no verdict")
    names = list(results)
    lines = ["# Fine-tuning loop report", "",
             f"Pairs: {meta['pairs']} (seed {meta['seed']}). `dev`: held-out pairs of the training sources; "
             "`unseen`: sources never trained on. Each pair is judged in both presentations; accuracy counts no "
             "verdict as wrong. `(free)`: the same model without constrained decoding.", "",
             "| model | program | " + " | ".join(f"{n}: {label}" for n in names for label in labels) + " |",
             "|---|---|" + "---|" * (len(names) * len(labels))]
    keys = []
    for runs in results.values():
        for r in runs:
            if (r.backend, r.program) not in keys:
                keys.append((r.backend, r.program))
    for backend, program in keys:
        cells = []
        for name in names:
            match = next((r for r in results[name] if (r.backend, r.program) == (backend, program)), None)
            values = metric_values(match.overall, match.run) if match else {}
            for label in labels:
                cell = format_value(values.get(label), "{:.1%}")
                if label == "accuracy" and match:
                    cell += format_ci(match.overall["accuracy"]["ci"])
                cells.append(cell)
        lines.append(f"| {backend} | {program} | " + " | ".join(cells) + " |")
    lines += ["", "## Stages (wall time)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in stages.items()]
    lines += [f"| total | {sum(stages.values()):.0f} |", "", "## Training", "",
              "| model | rows / pairs | steps | first loss | final loss | dev loss | seconds |", "|---|---|---|---|---|---|---|"]
    for name, card in cards.items():
        if name == "data":
            continue
        rows = card.get("train_rows") or card.get("train_pairs")
        losses = " | ".join(format_value(card.get(k), "{:.3f}") for k in ("first_loss", "final_loss", "eval_loss"))
        lines.append(f"| {name} | {rows} {card.get('rows_by_kind') or ''} | {card.get('steps')} | {losses} | "
                     f"{card.get('seconds') or 0:.0f} |")
    lines += [""] + [f"![{name} training curve](models/{name}/training_curve.png)" for name in cards if name != "data"]
    if "data" in cards:
        lines += ["", "## Data", "", "```json", json.dumps({k: cards["data"][k] for k in cards["data"] if k != "config"}, indent=1),
                  "```"]
    lines += ["", "Per-set reports with per-source tables and plots: `eval/dev/report.md`, `eval/unseen/report.md`.", ""]
    return "\n".join(lines)
