"""The service's API contract as pydantic types: what `/predict` and `/feedback` take and answer.

BentoML publishes these types in the OpenAPI document (``/docs.json``) and the guard checks every
body against the same types, so the document says what is enforced (docs/serving.md). The label
types are a task's (:func:`task_types`): each task's document lists its own labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator
from pydantic_core import PydanticCustomError

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # what new_request_id makes, and no path tricks
NOT_BLANK = r"\S"  # at least one character that is not white space


class PredictRequest(BaseModel):
    """The body of ``POST /predict``; :func:`predict_request` sets the deployment's limits."""

    # Python's regex engine, so that "blank" means what str.isspace() says it means.
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")

    texts: list[str]

    @field_validator("texts")
    @classmethod
    def _no_nul(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            if "\x00" in text:
                raise PydanticCustomError(
                    "nul_character", "texts[{index}] contains a NUL character", {"index": i}
                )
        return texts


@lru_cache(maxsize=8)
def predict_request(max_texts: int, max_chars: int) -> type[PredictRequest]:
    """:class:`PredictRequest` with at most ``max_texts`` texts of at most ``max_chars`` each
    (``DRIFTLOOP_MAX_TEXTS``, ``DRIFTLOOP_MAX_CHARS``)."""
    # Constraints only, no validator, in the item type: BentoML repeats an item type's metadata
    # when it wraps the model, and a repeated validator hides the lengths from its OpenAPI.
    text = Annotated[str, StringConstraints(min_length=1, max_length=max_chars, pattern=NOT_BLANK)]
    texts = Annotated[
        list[text],  # type: ignore[valid-type]
        Field(
            min_length=1,
            max_length=max_texts,
            description="Tweets to classify: not blank, no NUL character",
        ),
    ]
    return create_model("PredictRequest", __base__=PredictRequest, texts=(texts, ...))


class FeedbackRequest(BaseModel):
    """The body of ``POST /feedback`` (``label``: one of the task's, :func:`task_types`)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        pattern=REQUEST_ID_PATTERN, description="The request_id that /predict returned"
    )
    label: str = Field(description="The true label of that prediction")


class Prediction(BaseModel):
    """One classified text."""

    label: str
    scores: dict[str, float] = Field(description="Probability of each label")
    request_id: str = Field(description="Quote it in /feedback to report the true label")
    model_version: str = Field(description="The registered model version that answered")


class PredictResponse(BaseModel):
    """The answer of ``POST /predict``: one prediction per text, in order."""

    predictions: list[Prediction]
    model_version: str = Field(description="The registered model version that answered")


class FeedbackResponse(BaseModel):
    """The answer of ``POST /feedback``."""

    request_id: str
    label: str
    status: Literal["recorded", "queued"]


@dataclass(frozen=True)
class TaskTypes:
    """One task's contract: the generic types with ``label`` narrowed to the task's labels."""

    task: str
    labels: tuple[str, ...]
    label: Any  # Literal[the labels]
    feedback_request: type[FeedbackRequest]
    prediction: type[Prediction]
    predict_response: type[PredictResponse]
    feedback_response: type[FeedbackResponse]

    @property
    def feedback_example(self) -> str:
        return '{"request_id": "...", "label": "' + "|".join(self.labels) + '"}'


@lru_cache(maxsize=32)
def task_types(task: str, labels: tuple[str, ...]) -> TaskTypes:
    """The request and answer types of ``task``, whose labels are ``labels``.

    Their names start with the task's (``SentimentFeedbackRequest``), so that one OpenAPI
    document can hold every task's.
    """
    label: Any = Literal[labels]  # type: ignore[valid-type]
    title = "".join(part.capitalize() for part in task.replace("-", "_").split("_"))
    described = Annotated[label, Field(description=f"One of the {task} task's labels")]
    feedback_request = create_model(
        f"{title}FeedbackRequest",
        __base__=FeedbackRequest,
        label=(described, Field(description="The true label of that prediction")),
    )
    prediction = create_model(f"{title}Prediction", __base__=Prediction, label=(label, ...))
    predictions: Any = list[prediction]  # type: ignore[valid-type]
    predict_response = create_model(
        f"{title}PredictResponse", __base__=PredictResponse, predictions=(predictions, ...)
    )
    feedback_response = create_model(
        f"{title}FeedbackResponse", __base__=FeedbackResponse, label=(label, ...)
    )
    return TaskTypes(
        task=task,
        labels=labels,
        label=label,
        feedback_request=feedback_request,
        prediction=prediction,
        predict_response=predict_response,
        feedback_response=feedback_response,
    )
