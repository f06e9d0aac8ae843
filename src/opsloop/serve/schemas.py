"""Pydantic models that document the HTTP API in the OpenAPI schema (`/docs`) — docs only.

Requests are never validated through these: the hot path parses with orjson in
`opsloop.serve.protocol`, and routes return ready-made responses. They exist so `/docs` shows
what each endpoint takes and returns.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    error: str = Field(examples=["input shape [1, 8] does not match the model's ['N', 1, 8, 8]"])


class InferInputTensor(BaseModel):
    name: str = Field(examples=["pixels"])
    shape: list[int] = Field(examples=[[1, 1, 8, 8]])
    datatype: str = Field(examples=["FP32"])
    data: list[Any] | None = Field(
        None, description="Row-major values, flat or nested; omit with the binary extension"
    )
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data_size": 256}])


class InferRequestedOutput(BaseModel):
    name: str = Field(examples=["probabilities"], description="probabilities, label or embedding")
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data": False}])


class InferRequest(BaseModel):
    """An Open Inference Protocol (V2) infer request: one input tensor of raw pixels."""

    model_config = ConfigDict(json_schema_extra={"title": "InferRequest"})

    id: str | None = Field(
        None,
        max_length=128,
        description="Your id for the request (at most 128 characters), echoed in the response "
        "and used to join labels posted to /feedback; the server makes one when it is absent",
    )
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data_output": True}])
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = Field(
        None, description="Absent (or empty): every output, probabilities, label and embedding"
    )


class InferOutputTensor(BaseModel):
    name: str = Field(examples=["label"])
    shape: list[int] = Field(examples=[[1]])
    datatype: str = Field(examples=["INT64"])
    data: list[float] | None = Field(
        None, examples=[[3]], description="Row-major values; absent for a binary output"
    )
    parameters: dict[str, Any] | None = Field(
        None,
        examples=[{"binary_data_size": 40}],
        description="For a binary output: its byte count in the binary part of the body",
    )


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str = Field(examples=["digits"])
    model_version: str = Field(examples=["3"])
    id: str = Field(description="The request's `id`, or the one the server made for it")
    parameters: dict[str, Any] | None = Field(
        None,
        examples=[{"role": "canary"}],
        description="Only on an answer by the candidate model: its role",
    )
    outputs: list[InferOutputTensor]


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    role: str = Field(examples=["champion"], description="champion, or canary for the candidate")
    model_name: str = Field(examples=["digits"])
    model_version: str = Field(examples=["3"])
    label: int = Field(examples=[3])
    class_name: str = Field(examples=["3"])
    confidence: float = Field(examples=[0.98])
    probabilities: dict[str, float] = Field(description="Probability of every class, by name")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    name: str | None = Field(None, description="The model, on a model's readiness")
    ready: bool
    error: str | None = Field(None, description="Why not, while no model is loaded")


class ReloadResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    reloaded: bool
    model_name: str
    model_version: str
    previous_version: str | None


class FeedbackLabel(BaseModel):
    """A label for one served example (`POST /feedback`), as it arrives from a labelling system."""

    request_id: str = Field(
        min_length=1,
        max_length=128,
        description="The `id` the prediction was answered with (V2) or `request_id` (/predict)",
        examples=["order-1234"],
    )
    item: int = Field(0, ge=0, description="The example's row within its request")
    label: int | str = Field(description="A class index or a class name", examples=[3, "3"])


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Labels stored", examples=[1])
