"""Model-only ceilings of every serving backend, side by side, measured interleaved.

Each backend labels the validation tweets (``data/val.tsv``, sorted by token length, at most 64
tokens, batches of 32) in round-robin rounds at each thread count, so a noisy neighbour slows
all of them alike; texts/s is the median over rounds. Beside the service's candidates
(:data:`ml.serving.backends.BACKENDS`) it measures, for comparison only: ONNX Runtime fp32
(the same fused export, not quantised), torch's deprecated ``quantize_dynamic`` int8 (the old
default), bf16 weights (where the CPU has native bf16) and torchao's int8 (where torchao is
importable: ``uv run --with torchao==0.18.0 python -m benchmarks.backends_bench``). Macro-recall
and agreement with fp32 come from the same texts; the one :func:`ml.serving.backend_choice.pick`
chooses at the service's thread count is named. Writes
``benchmarks/results/backends.{json,md}`` (``backends_quick.*`` for ``--quick``).

The model is the registry's champion when there is one, else all-MiniLM-L6-v2 with a fresh
head: speed does not depend on training, but recall does, so an untrained model's recall is
chance and agreement with fp32 is then the accuracy check.

Usage: ``python -m benchmarks.backends_bench [--quick] [--threads 2 1]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
log = logging.getLogger("backends_bench")

# Rows that are measured for comparison but never served.
BENCH_ONLY = (
    "onnx-fp32",
    "torch-int8-deprecated",
    "bf16-weights",
    "torchao-int8",
    "torchao-int8-wo",
)
INT8_DOT_FLAGS = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})


def bench_runners(
    model: Any, model_dir: Path, threads: int, flags: frozenset[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every backend ready to run at ``threads`` threads, and why the others are not."""
    import torch

    from ml.serving import backends, onnx_export

    runners: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name in backends.BACKENDS:
        if (why := backends.unavailable(name, flags)) is not None:
            notes[name] = why
        else:
            runners[name] = backends.prepare(name, model, model_dir=model_dir, threads=threads)
    fused = onnx_export.onnx_files(model, model_dir)["fp32"]
    runners["onnx-fp32"] = onnx_export.OnnxModel(
        onnx_export.ort_session(fused, threads), model.config, fused
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runners["torch-int8-deprecated"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        )
    if flags & backends.BF16_FLAGS:
        runners["bf16-weights"] = copy.deepcopy(model).to(torch.bfloat16)
    else:
        notes["bf16-weights"] = backends.unavailable("bf16", flags) or ""
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        notes["torchao-int8"] = notes["torchao-int8-wo"] = "torchao is not installed"
    else:
        for name, config in (
            ("torchao-int8", Int8DynamicActivationInt8WeightConfig()),
            ("torchao-int8-wo", Int8WeightOnlyConfig()),
        ):
            quantised = copy.deepcopy(model)
            quantize_(quantised, config)
            runners[name] = quantised
    return runners, notes


def measure_ceilings(
    model_dir: str | Path,
    texts: list[str],
    *,
    threads: int,
    rounds: int = 3,
    batch_size: int = 32,
    max_length: int = 64,
    only: tuple[str, ...] | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Model-only texts/s of every backend at ``threads`` threads, interleaved over ``texts``.

    ``only`` limits the rows (e.g. :data:`ml.serving.backends.BACKENDS` for the service's
    candidates). A row ``PROBE_DROP`` times slower than the fastest on one batch is not run
    over all texts. ``fastest`` is the fastest service candidate: the ceiling a service at
    ``threads`` threads is compared with.
    """
    from ml.modeling import load_model
    from ml.serving import backend_choice, backends
    from ml.serving.tuning import set_torch_threads

    if model is None or tokenizer is None:
        model, tokenizer = load_model(model_dir)
    flags = backends.cpu_flags()
    previous = set_torch_threads(threads)
    try:
        runners, notes = bench_runners(model, Path(model_dir), threads, flags)
        if only is not None:
            runners = {k: v for k, v in runners.items() if k in only}
            notes = {k: v for k, v in notes.items() if k in only}
        batching = {"batch_size": batch_size, "max_length": max_length}
        mid = len(texts) // 2
        probe = backend_choice.interleaved_rates(
            runners, tokenizer, texts[mid : mid + batch_size], rounds=2, **batching
        )
        fastest_probe = max(max(r) for r in probe.values())
        for name in list(runners):
            if name != "fp32" and max(probe[name]) * backend_choice.PROBE_DROP < fastest_probe:
                notes[name] = (
                    f"{max(probe[name]):.1f} texts/s on the probe batch, over "
                    f"{backend_choice.PROBE_DROP:g}x slower than the fastest: not run further"
                )
                del runners[name]
        rates = backend_choice.interleaved_rates(
            runners, tokenizer, texts, rounds=rounds, **batching
        )
    finally:
        set_torch_threads(previous)
    rows: dict[str, Any] = {}
    for name in (*backends.BACKENDS, *BENCH_ONLY):
        if name in rates:
            rows[name] = {
                "texts_per_s": round(statistics.median(rates[name]), 1),
                "rounds": [round(x, 1) for x in rates[name]],
                "first_round": round(rates[name][0], 1),
            }
        elif name in notes:
            rows[name] = {"texts_per_s": None, "note": notes[name]}
        else:
            continue
        rows[name]["service_candidate"] = name in backends.BACKENDS
    served = [n for n in backends.BACKENDS if rows.get(n, {}).get("texts_per_s")]
    fastest = max(served, key=lambda n: rows[n]["texts_per_s"]) if served else None
    return {
        "threads": threads,
        "texts": len(texts),
        "rounds": rounds,
        "batch_size": batch_size,
        "max_length": max_length,
        "backends": rows,
        "fastest": fastest,
        "fastest_texts_per_s": rows[fastest]["texts_per_s"] if fastest else None,
    }


def accuracy(
    model_dir: Path, model: Any, tokenizer: Any, texts: list[str], labels: list[str]
) -> dict[str, dict[str, float]]:
    """Macro-recall and agreement with fp32 of every backend that runs here (one thread)."""
    from ml.params import load_params
    from ml.serving import backend_choice, backends
    from ml.serving.tuning import set_torch_threads

    previous = set_torch_threads(1)
    try:
        runners, _ = bench_runners(model, model_dir, 1, backends.cpu_flags())
        predicted = {
            name: backend_choice.labels_of(
                r, tokenizer, texts, load_params().task.labels, batch_size=32, max_length=64
            )
            for name, r in runners.items()
            if name != "torchao-int8" or backends.cpu_flags() & INT8_DOT_FLAGS
        }
    finally:
        set_torch_threads(previous)
    ref = predicted["fp32"]
    return {
        name: {
            "macro_recall": round(backend_choice.macro_recall(labels, p), 4),
            "agreement": round(sum(a == b for a, b in zip(p, ref, strict=True)) / len(ref), 4),
        }
        for name, p in predicted.items()
    }


def choose_model(work: Path) -> tuple[Path, str, bool]:
    """``(model dir, what it is, trained)``: the champion, else MiniLM with a fresh head."""
    from ml.artifacts import cached_model_dir
    from ml.modeling import load_tokenizer, new_classifier, save_model
    from ml.params import load_params
    from ml.registry import get_alias

    try:
        champion = get_alias("champion")
        if champion is not None:
            return cached_model_dir(champion.version), f"champion v{champion.version}", True
    except Exception as exc:  # noqa: BLE001 - no registry here
        log.info("no usable registry (%s)", exc)
    path = work / "minilm-fresh-head" / "model"
    if not (path / "config.json").is_file():
        save_model(new_classifier(load_params().task.labels), load_tokenizer(), path)
    return path, "untrained all-MiniLM-L6-v2 + fresh 3-class head", False


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ml.settings import get_settings

    model_dir, what, trained = choose_model(get_settings().work_dir / "bench" / "backends")
    return measure(
        model_dir,
        what,
        trained,
        quick=args.quick,
        texts_n=args.texts,
        rounds=args.rounds,
        threads=args.threads,
    )


def measure(
    model_dir: Path,
    what: str,
    trained: bool,
    *,
    quick: bool = False,
    texts_n: int | None = None,
    rounds: int | None = None,
    threads: list[int] | tuple[int, ...] = (2, 1),
) -> dict[str, Any]:
    """Every backend's ceiling at each of ``threads``, its accuracy on the validation tweets,
    and the one :func:`ml.serving.backend_choice.pick` chooses at the service's thread count."""
    from ml.modeling import load_model, token_lengths
    from ml.serving import backend_choice, backends
    from ml.serving.tuning import serving_threads

    started = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    val = backend_choice.read_val()
    if val is None:
        raise SystemExit("data/val.tsv is missing: run `make data`")
    n = texts_n or (128 if quick else 2000)
    texts, labels = val[0][:n], val[1][:n]
    lengths = token_lengths(tokenizer, texts, 64)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    rounds = rounds or (2 if quick else 5)
    ceilings = [
        measure_ceilings(
            model_dir, texts, threads=t, rounds=rounds, model=model, tokenizer=tokenizer
        )
        for t in threads
    ]
    acc = accuracy(model_dir, model, tokenizer, texts, labels)
    from ml.params import load_params

    service_threads = serving_threads(load_params().serve.threads)
    at_service = next((c for c in ceilings if c["threads"] == service_threads), ceilings[0])
    results = {
        name: backend_choice.CandidateResult(
            name,
            texts_per_s=row["texts_per_s"],
            rounds=tuple(row.get("rounds", ())),
            macro_recall=acc.get(name, {}).get("macro_recall"),
            agreement=acc.get(name, {}).get("agreement"),
            note=row.get("note", ""),
        )
        for name, row in at_service["backends"].items()
        if row["service_candidate"]
    }
    chosen, marked = backend_choice.pick(results, max_recall_drop=0.01)
    return {
        "started_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "model": what,
        "trained": trained,
        "texts": len(texts),
        "machine": {
            "cpu": backends.cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "bf16_native": bool(backends.cpu_flags() & backends.BF16_FLAGS),
            "int8_dot": sorted(backends.cpu_flags() & INT8_DOT_FLAGS),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "torch": backends._version("torch"),
            "onnxruntime": backends._version("onnxruntime"),
            "torchao": backends._version("torchao"),
        },
        "ceilings": ceilings,
        "accuracy": acc,
        "service_threads": service_threads,
        "chosen": chosen,
        "chosen_eligible": {n: r.eligible for n, r in marked.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def write_results(result: dict[str, Any], out_dir: Path = RESULTS) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "backends_quick" if result["quick"] else "backends"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Serving backends: model-only ceilings",
        "",
        f"Run {result['started_at']} ({'quick smoke run' if result['quick'] else 'full run'}), "
        f"model: {result['model']}.",
        *table_lines(result),
    ]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def table_lines(result: dict[str, Any]) -> list[str]:
    """The backends table of a :func:`measure` result, with how it was measured (Markdown)."""
    m = result["machine"]
    threads = [c["threads"] for c in result["ceilings"]]
    recall_note = (
        ""
        if result["trained"]
        else " The model is untrained, so macro-recall is chance; "
        "agreement with fp32 is the accuracy check."
    )
    lines = [
        "",
        f"{result['texts']} validation tweets sorted by length, max 64 tokens, batches of 32, "
        f"{result['ceilings'][0]['rounds']} interleaved rounds (median texts/s); macro-recall "
        f"on the same tweets.{recall_note}",
        f"Machine: {m['cpu']}, {m['cores']} cores, native bf16: {m['bf16_native']}, int8 dot "
        f"products: {m['int8_dot'] or 'none'}; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, torchao {m['torchao'] or 'not installed'}; load average at start "
        f"{m['load_average_at_start']}.",
        "",
        "| backend | served | "
        + " | ".join(f"texts/s, {t} thr" for t in threads)
        + " | × fp32 | macro-recall | agreement with fp32 | note |",
        "|---|---|" + "---|" * len(threads) + "---|---|---|---|",
    ]
    first = result["ceilings"][0]["backends"]
    for name, row in first.items():
        rates = [c["backends"].get(name, {}).get("texts_per_s") for c in result["ceilings"]]
        fp32 = first.get("fp32", {}).get("texts_per_s")
        ratio = f"{row['texts_per_s'] / fp32:.2f}" if row["texts_per_s"] and fp32 else "–"
        acc = result["accuracy"].get(name, {})
        mark = (
            "**chosen**"
            if name == result["chosen"]
            else ("yes" if row["service_candidate"] else "")
        )
        lines.append(
            f"| {name} | {mark} | "
            + " | ".join(str(r) if r else "–" for r in rates)
            + f" | {ratio} | {acc.get('macro_recall', '–')} | {acc.get('agreement', '–')} | "
            f"{row.get('note', '')} |"
        )
    lines += [
        "",
        f"Chosen at the service's {result['service_threads']} thread(s): **{result['chosen']}** "
        "(fastest service candidate within 1 point of fp32's macro-recall; "
        "ml.serving.backend_choice.pick). × fp32 is at the first thread count.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 texts, 2 rounds (smoke run)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--texts", type=int, default=None, help="validation texts to use")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the model process runs (before torch)
    result = run(args)
    json_path, md_path = write_results(result)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
