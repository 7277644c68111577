"""Does training the verdict token make the 1.5B a judge? Train on labels, then measure on the quality bench's test pairs.

    .venv/bin/python bench/verdict_distill.py [--preset qwen2.5-coder-1.5b] [--per-source 40] [--fresh] [--out bench/results/verdict-1.5b]
        [--adapter reflectagent/data/adapters/qwen2.5-coder-1.5b-verdict]

Zero-shot, the 1.5B's verdict-token probability carries some signal and its order average is near
chance over five sources (``bench/judge_quality.py``: direct-prob 55.6% and 51.0% on two samples).
This trains that very token: verdict rows (``reflectagent finetune data --kind verdict``: ``Prefer``,
both orders, the label following the response) from the **train** split of the same five human-labelled
sets (seed 0, as ``eval --split`` and the quality bench draw them; its test pairs are the test split),
less every train pair that shares a prompt with any set's dev or test pair (RM-Bench, PandaLM and HHH pair
one prompt with several responses, and prompts recur across sets) or with the 32 pairs shipped for the README's
demo, so no test pair, demo pair or their prompts are trained on; ``--per-source`` pairs each, then LoRA SFT
(``train_sft``: checkpoints every ``--save-steps``, resumed when run again), a merged model, and
``direct-prob`` on the quality bench's first test sample (``--skip 0 --per-source 32``) and, with
``--fresh``, its second (``--skip 32 --per-source 35``). Nothing is chosen by looking at a test pair:
the sizes and the training settings are fixed here before the run, and the dev rows (10% of the
training pairs) give the only feedback, an eval loss.

Every judgment is cached in ``OUT/cache`` (committed with the report). The adapter (about 18 MB) is
written to ``--adapter``, by default the folder the ``<preset>-verdict`` tuned preset ships
(``reflectagent/data/adapters``): this script is how that adapter is made. The merged model is kept in
``~/.cache/reflectagent/verdict-merged/<the adapter's fingerprint>`` (not committed: it is rebuilt from the
adapter). Run again, each stage that has its output is skipped; an adapter trained with other settings or
pairs is refused (``ADAPTER/training.json``). The merged folder records what it was merged from (the
base's GGUF sha256 and the adapter's fingerprint), so the cache keys on those, as it does for the tuned
preset (``reflectagent.backends.model_identity``): the same adapter judged here and through the preset
shares its judgments, on any machine.
Run it with nothing else on the machine: the 1.5B in training and the 1.5B served do not fit in 24 GB
together (``results/README.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from common import SOURCES, in_own_process, load_source, log_to_stderr, test_pairs  # bench/, beside this script
from provenance import provenance

from reflectagent.backends import fingerprint, resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.eval import EvalRun, run_eval, write_report
from reflectagent.finetune import DataConfig, SFTJobConfig, label_data, train_sft
from reflectagent.finetune.selection import usable
from reflectagent.models import is_prepared, merge_lora, prepare_model, read_source
from reflectagent.pairs import sample_pairs
from reflectagent.paths import cache_root
from reflectagent.presets import ADAPTERS_DIR, prepared_sha256
from reflectagent.programs import named_program
from reflectagent.splits import prompt_disjoint, split_pairs, stable_fraction


def train_pairs(per_source: int, max_chars: int):
    loaded = {source: load_source(source) for source in SOURCES}
    splits = {source: split_pairs(pairs, seed=0) for source, pairs in loaded.items()}
    held_out = [
        p for split in splits.values() for p in split["dev"] + split["test"]
    ]  # every set's: prompts recur across sets
    held_out += sample_pairs()  # the README's demo judges these: it must not judge what was trained on
    chosen = []
    for source in SOURCES:
        train = prompt_disjoint(splits[source]["train"], held_out)  # no test prompt, in other pairs either
        kept = [p for p in train if usable(p, max_chars)]
        chosen += sorted(kept, key=lambda p: stable_fraction("verdict-train", p.id))[:per_source]
    return chosen


def training_key(args: argparse.Namespace, chosen) -> dict:
    """What the adapter is trained from: a run with other settings or pairs must not reuse it."""
    return {
        "preset": args.preset,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "max_steps": args.max_steps,
        "pairs": hashlib.sha256("\n".join(sorted(p.id for p in chosen)).encode()).hexdigest()[:16],
    }


def train(args: argparse.Namespace, chosen) -> None:
    """Verdict rows and LoRA SFT (resumed from its checkpoints) into ``--adapter``, its weights copied last."""
    log_to_stderr()
    adapter, key = args.adapter, training_key(args, chosen)
    settings = Settings(backends={"student": BackendConfig(model="embedded", model_path=args.preset)})
    run = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]  # checkpoints of this very job only
    data_dir, job_dir = cache_root() / "verdict-data" / run, cache_root() / "verdict-sft" / run
    label_data(
        chosen,
        "student",
        settings,
        data_dir,
        DataConfig(fractions="0.9,0.1,0"),
        {"labels": "the data files' own labels (train split, seed 0)"},
    )
    job = SFTJobConfig(
        base_model=args.preset,
        data=str(data_dir / "unified"),
        output_dir=str(job_dir),
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        max_length=1024,
        per_device_batch=1,
        gradient_accumulation=8,  # two 1024-token rows at once: over 24 GB
        save_steps=args.save_steps,
        eval_steps=args.save_steps,
    )
    trained = train_sft(job)
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "training.json").write_text(json.dumps(key, indent=1))
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the base's tokenizer is used with it
        shutil.copy(trained / name, adapter / f"{name}.partial")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / f"{name}.partial").rename(adapter / name)
    for name in ("run_card.json", "training_curve.png"):
        if (job_dir / name).exists():
            shutil.copy(job_dir / name, args.out / name)
    shutil.copy(data_dir / "data_card.json", args.out / "data_card.json")


def merged_source(args: argparse.Namespace) -> dict:
    """What the merged folder is made from: its record, and the judgment cache's name for it (``model_identity``)."""
    adapter = args.adapter
    return {
        "name": f"{args.preset} + {adapter.name}",
        "base_sha256": prepared_sha256(prepare_model(args.preset)),
        "adapter_fingerprint": fingerprint(adapter),
        "dtype": "float32",
        "max_model_len": 4096,
    }


def merge(args: argparse.Namespace) -> None:
    """The adapter merged into the base, in float32 as the preset is served; lands atomically."""
    log_to_stderr()
    merged = cache_root() / "verdict-merged" / fingerprint(args.adapter)  # another adapter, another folder
    merge_lora(prepare_model(args.preset), args.adapter, merged, "float32", source=merged_source(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-coder-1.5b")
    parser.add_argument(
        "--per-source",
        type=int,
        default=40,
        help="training pairs per source (two rows each; HHH and PandaLM have about 50 usable)",
    )
    parser.add_argument(
        "--max-chars", type=int, default=2000, help="training pairs whose texts fit in this many characters"
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="the SFT job's default")
    parser.add_argument(
        "--save-steps", type=int, default=10, help="checkpoint every N optimizer steps: an interrupted run resumes"
    )
    parser.add_argument(
        "--max-steps", type=int, default=-1, help="a short run for trying the script (overrides --epochs)"
    )
    parser.add_argument("--fresh", action="store_true", help="also judge the quality bench's second sample")
    parser.add_argument(
        "--eval-per-source",
        type=int,
        default=32,
        help="the first sample's pairs per source (at most 32: the fresh sample starts at 33)",
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/verdict-1.5b"))
    parser.add_argument(
        "--adapter",
        type=Path,
        help="where the adapter is trained to (default: the one the "
        "'<preset>-verdict' preset ships, in reflectagent/data/adapters)",
    )
    args = parser.parse_args()
    args.adapter = args.adapter or ADAPTERS_DIR / f"{args.preset}-verdict"
    if args.eval_per_source > 32:
        parser.error(
            "--eval-per-source is at most 32: the quality bench's fresh sample starts at each source's 33rd pair"
        )
    log_to_stderr()
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = args.adapter
    chosen = train_pairs(args.per_source, args.max_chars)
    made_from = adapter / "training.json"
    if made_from.exists() and json.loads(made_from.read_text()) != training_key(args, chosen):
        raise SystemExit(
            f"{adapter} was trained with other settings or pairs ({made_from.read_text().strip()}): "
            "give another --adapter and --out, or delete that folder to train again"
        )

    if not (adapter / "adapter_model.safetensors").exists():  # copied last: present means the adapter is whole
        in_own_process(train, args, chosen)
    merged = cache_root() / "verdict-merged" / fingerprint(adapter)
    if not (is_prepared(merged) and read_source(merged) == merged_source(args)):  # a merge of older code has no record
        in_own_process(merge, args)

    samples = [("first", 0, args.eval_per_source)] + ([("fresh", 32, 35)] if args.fresh else [])
    settings = Settings(
        backends={
            "trained": BackendConfig(model="embedded", model_path=str(merged), dtype="float32", context_tokens=4096)
        }
    )
    lm = resolve_backend("trained", settings)
    results = []
    with use_cache(JudgmentCache(args.out / "cache")):
        for name, skip, per_source in samples:
            pairs = test_pairs(per_source, 2500, skip)
            [result] = run_eval(
                pairs,
                [
                    EvalRun(
                        f"direct-prob ({name} sample)",
                        f"{args.preset} + verdict LoRA",
                        named_program("direct-prob"),
                        lm,
                    )
                ],
                concurrency=args.concurrency,
                progress=sys.stderr.isatty(),
            )
            results.append(result)
    meta = {
        **provenance(),
        "data": [f"{s}.jsonl (test split, seed 0)" for s in SOURCES],
        "split": "test",
        "seed": 0,
        "pairs": sum(r.overall.pairs for r in results),
        "train": {
            "split": "train, less pairs sharing a dev or test prompt",
            "per_source_asked": args.per_source,
            "pairs_by_source": dict(Counter(p.source for p in chosen)),
            "data_card": json.loads((args.out / "data_card.json").read_text())
            if (args.out / "data_card.json").exists()
            else None,
            "max_chars": args.max_chars,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
        },
        "test": [{"sample": n, "skip": s, "per_source": k} for n, s, k in samples],
    }
    write_report(results, args.out, meta)  # meta is in report.json
    print((args.out / "report.md").read_text().split("## Accuracy per category")[0])


if __name__ == "__main__":
    main()
