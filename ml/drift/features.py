"""The features both sides of a drift report get: text descriptors, embeddings, predictions.

One forward pass of the judged model (:func:`ml.modeling.forward_batches`) gives a text's
mean-pooled embedding and its class scores; see ``docs/drift.md`` for what each feature means.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

# Per-text descriptors, in report order. All numeric; see docs/drift.md for each meaning.
DESCRIPTORS: tuple[str, ...] = (
    "chars",
    "words",
    "tokens",
    "split_word_share",
    "unk_share",
    "hashtags",
    "mentions",
    "urls",
    "upper_share",
    "non_ascii_share",
    "digit_share",
)
SCORE_PREFIX = "score_"


def score_columns(labels: Sequence[str]) -> list[str]:
    """The columns that hold each label's score, in the labels' order."""
    return [f"{SCORE_PREFIX}{label}" for label in labels]


EMBEDDING_PREFIX = "emb_"

_HASHTAG = re.compile(r"#\w+")
_MENTION = re.compile(r"@\w+")
_URL = re.compile(r"https?://\S+|www\.\S+", re.IGNORECASE)


def text_descriptors(texts: list[str], tokenizer: Any) -> pd.DataFrame:
    """Numeric descriptors of each text (see :data:`DESCRIPTORS`), cheap and model-free.

    ``split_word_share`` is the share of the tokenizer's words that it cuts into several word
    pieces and ``unk_share`` the share of pieces that are ``[UNK]``: together they measure how
    much of the text lies outside the model's vocabulary.
    """
    import numpy as np
    import pandas as pd

    s = pd.Series(texts, dtype="object").astype(str)
    chars = s.str.len().to_numpy(dtype=float)
    letters = s.str.count(r"[^\W\d_]").to_numpy(dtype=float)
    enc = tokenizer(list(s), add_special_tokens=False, truncation=False)
    unk_id = tokenizer.unk_token_id
    tokens = np.zeros(len(s))
    unk = np.zeros(len(s))
    split_share = np.zeros(len(s))
    for i, ids in enumerate(enc["input_ids"]):
        tokens[i] = len(ids)
        unk[i] = sum(1 for t in ids if t == unk_id)
        word_ids = [w for w in enc.word_ids(i) if w is not None]
        if word_ids:
            pieces = np.bincount(word_ids)
            pieces = pieces[pieces > 0]
            split_share[i] = float((pieces > 1).mean())
    return pd.DataFrame(
        {
            "chars": chars,
            "words": s.str.split().str.len().fillna(0).to_numpy(dtype=float),
            "tokens": tokens,
            "split_word_share": split_share,
            "unk_share": unk / np.maximum(tokens, 1),
            "hashtags": s.str.count(_HASHTAG.pattern).to_numpy(dtype=float),
            "mentions": s.str.count(_MENTION.pattern).to_numpy(dtype=float),
            "urls": s.str.count(_URL.pattern, flags=re.IGNORECASE).to_numpy(dtype=float),
            "upper_share": s.str.count(r"[A-Z]").to_numpy(dtype=float) / np.maximum(letters, 1),
            "non_ascii_share": s.str.count(r"[^\x00-\x7f]").to_numpy(dtype=float)
            / np.maximum(chars, 1),
            "digit_share": s.str.count(r"\d").to_numpy(dtype=float) / np.maximum(chars, 1),
        },
        index=range(len(s)),
    )


def encode(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int = 64,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean-pooled last hidden states ``(n, hidden)`` and, for a classifier, its probabilities.

    One forward pass gives both: a sequence classifier is run with ``output_hidden_states``; a
    bare encoder (``AutoModel``) gives embeddings only (probabilities ``None``).
    """
    import numpy as np
    import torch

    from ml.modeling import forward_batches

    emb = np.zeros((len(texts), int(model.config.hidden_size)), dtype=np.float32)
    probs: np.ndarray | None = None
    batches = forward_batches(
        model, tokenizer, texts, batch_size, max_length, device, output_hidden_states=True
    )
    for idx, enc, out in batches:
        states = out.hidden_states[-1]
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        emb[idx] = pooled.float().cpu().numpy()
        logits = getattr(out, "logits", None)
        if logits is not None:
            if probs is None:
                probs = np.zeros((len(texts), logits.shape[-1]), dtype=np.float32)
            probs[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return emb, probs


def compute_features(
    df: pd.DataFrame,
    model: Any,
    tokenizer: Any,
    *,
    labels: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
) -> pd.DataFrame:
    """``df`` plus descriptors, embeddings (``emb_*``) and prediction columns.

    Rows that already carry scores for every one of the task's ``labels`` (the prediction log)
    keep them: that is what production answered. Otherwise ``model`` must be a classifier for
    those labels and its scores are added (the reference). ``label`` is the predicted label and
    ``confidence`` the highest score.
    """
    import numpy as np
    import pandas as pd

    base = df.reset_index(drop=True)
    texts = base["text"].astype(str).tolist()
    emb, probs = encode(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    out = base.copy()
    columns = score_columns(labels)
    if not set(columns) <= set(out.columns):
        if probs is None and texts:
            raise ValueError(
                "rows have no score_* columns and the model has no classification head; pass "
                "the champion classifier, or rows from the prediction log"
            )
        probs = probs if probs is not None else np.zeros((0, len(labels)), dtype=np.float32)
        if probs.shape[1] != len(labels):
            raise ValueError(
                f"the model predicts {probs.shape[1]} classes, the task has {list(labels)}"
            )
        for j, col in enumerate(columns):
            out[col] = probs[:, j].astype(float)
        out["label"] = [labels[k] for k in probs.argmax(axis=1)]
    scores = out[columns].to_numpy(dtype=float)
    out["confidence"] = scores.max(axis=1)
    if "label" not in out.columns:
        out["label"] = [labels[k] for k in scores.argmax(axis=1)]
    desc = text_descriptors(texts, tokenizer)
    width = len(str(emb.shape[1] - 1))
    emb_cols = pd.DataFrame(
        emb.astype(np.float32),
        columns=[f"{EMBEDDING_PREFIX}{i:0{width}d}" for i in range(emb.shape[1])],
    )
    return pd.concat([out, desc, emb_cols], axis=1)


def embedding_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(EMBEDDING_PREFIX)]


def has_features(df: pd.DataFrame) -> bool:
    """True when ``df`` already carries :func:`compute_features`' columns."""
    needed = {*DESCRIPTORS, "label", "confidence"}
    return needed <= set(df.columns) and bool(embedding_columns(df))
