"""The decode and encode steps of the V2 protocol and of /predict, without HTTP."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from opsloop.predictions import MAX_REQUEST_ID
from opsloop.serve import protocol
from opsloop.serve.protocol import (
    InferRequest,
    ModelSignature,
    RequestedOutput,
    RequestError,
    check_content_type,
    decode_infer_request,
    encode_infer_response,
    encode_predict_response,
    model_metadata,
    new_request_id,
    output_tensors,
    parse_header_length,
)

SIGNATURE = ModelSignature(
    name="digits",
    version="3",
    input_name="pixels",
    item_shape=(1, 8, 8),
    class_names=tuple(str(i) for i in range(10)),
    embedding_size=16,
)


def body(tensor: dict[str, Any] | None = None, **request: Any) -> bytes:
    tensor = {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0] * 64} | (
        tensor or {}
    )
    return orjson.dumps({"inputs": [tensor]} | request)


def decode(payload: bytes, **options: Any) -> InferRequest:
    return decode_infer_request(payload, SIGNATURE, **options)


def test_decodes_flat_json_data(pixels: npt.NDArray[np.float32]) -> None:
    payload = body({"shape": [5, 1, 8, 8], "data": pixels.ravel().tolist()}, id="req-1")
    request = decode(payload)
    assert request.id == "req-1"
    assert request.pixels.dtype == np.float32
    np.testing.assert_array_equal(request.pixels, pixels)
    # No outputs named: every output the metadata lists, as the protocol (and Triton) does.
    assert [o.name for o in request.outputs] == ["probabilities", "label", "embedding"]


def test_decodes_nested_data_and_other_numeric_types(pixels: npt.NDArray[np.float32]) -> None:
    nested = np.rint(pixels).astype(np.uint8)
    request = decode(body({"shape": [5, 1, 8, 8], "datatype": "UINT8", "data": nested.tolist()}))
    np.testing.assert_array_equal(request.pixels, nested.astype(np.float32))
    assert request.pixels.dtype == np.float32


def test_decodes_the_binary_tensor_extension(pixels: npt.NDArray[np.float32]) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [5, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        }
    )
    request = decode(header + pixels.tobytes(), header_length=len(header))
    np.testing.assert_array_equal(request.pixels, pixels)
    assert request.outputs == (RequestedOutput("label", binary=True),)


def test_generates_a_request_id_when_none_is_given() -> None:
    first, second = decode(body()), decode(body())
    assert len(first.id) == 16  # 96 random bits, URL-safe
    assert first.id != second.id


@pytest.mark.parametrize(
    ("payload", "reason", "message"),
    [
        (b"{not json", "malformed_json", "malformed JSON"),
        (b"[1, 2]", "malformed_json", "must be a JSON object"),
        (b'{"inputs": []}', "bad_inputs", "exactly one tensor"),
        (b'{"inputs": {"name": "pixels"}}', "bad_inputs", "exactly one tensor"),
        (body({"name": "image"}), "bad_input_name", "unknown input 'image'"),
        (body({"datatype": "BYTES"}), "bad_datatype", "unsupported datatype 'BYTES'"),
        (body({"datatype": None}), "bad_datatype", "unsupported datatype"),
        (body({"shape": [1, 8, 8]}), "bad_shape", r"does not match the model's \['N', 1, 8, 8\]"),
        (body({"shape": [1, 1, 28, 28]}), "bad_shape", "does not match"),
        (body({"shape": [0, 1, 8, 8], "data": []}), "bad_shape", "N >= 1"),
        (body({"shape": [1.0, 1, 8, 8]}), "bad_shape", "does not match"),
        (body({"shape": "1,1,8,8"}), "bad_shape", "does not match"),
        (body({"data": [1.0] * 63}), "data_size_mismatch", "has 63 values but shape"),
        (body({"data": [[1.0] * 64, [1.0]]}), "bad_data", "only numbers"),
        (body({"data": ["a"] * 64}), "bad_data", "only numbers"),
        (body({"data": "abc"}), "bad_data", "must be a list"),
        (body({"data": None}), "bad_data", "must be a list"),
        (body({"data": [None] * 64}), "non_finite", "NaN, infinity or null"),
        (body({"data": [1e39] * 64}), "non_finite", "beyond float32"),
        (body({"data": [1.0] * 64}, outputs=[{"name": "logits"}]), "bad_outputs", "'logits'"),
        (body({"data": [1.0] * 64}, outputs="probabilities"), "bad_outputs", "must be a list"),
        (body({"parameters": [1]}), "bad_parameters", "must be a JSON object"),
        (body(id=7), "bad_id", "'id' must be a string"),
        (
            b'{"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", '
            b'"data": [NaN' + b", 1.0" * 63 + b"]}]}",
            "non_finite",
            "NaN or infinity",
        ),
        (
            b'{"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", '
            b'"data": [1e999' + b", 1.0" * 63 + b"]}]}",
            "non_finite",
            "NaN or infinity",
        ),
    ],
)
def test_rejects_bad_requests_with_a_reason(payload: bytes, reason: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as caught:
        decode(payload)
    assert caught.value.status == 400
    assert caught.value.reason == reason


def test_a_batch_over_the_row_limit_is_413() -> None:
    with pytest.raises(RequestError, match="exceeds the limit of 1024") as caught:
        decode(body({"shape": [2000, 1, 8, 8]}))
    assert (caught.value.status, caught.value.reason) == (413, "too_many_rows")


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([{"name": ["label"]}], "unknown output \\['label'\\]"),
        ([{"name": {"a": 1}}], "unknown output"),
        ([{"name": None}], "unknown output None"),
        ([{"name": 3}], "unknown output 3"),
    ],
)
def test_an_output_name_that_is_not_a_string_is_400(outputs: Any, message: str) -> None:
    with pytest.raises(RequestError, match=message) as caught:
        decode(body(outputs=outputs))
    assert (caught.value.status, caught.value.reason) == (400, "bad_outputs")


def test_request_ids_are_bounded() -> None:
    assert decode(body(id="x" * MAX_REQUEST_ID)).id == "x" * MAX_REQUEST_ID
    with pytest.raises(RequestError, match=f"129 characters is over the limit of {MAX_REQUEST_ID}"):
        decode(body(id="x" * (MAX_REQUEST_ID + 1)))
    assert decode(body(id="")).id  # empty: the server makes one


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "Application/JSON",
     "application/octet-stream"],
)  # fmt: skip
def test_infer_accepts_json_binary_or_no_content_type(content_type: str | None) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""],
)
def test_infer_refuses_other_content_types_with_415(content_type: str) -> None:
    with pytest.raises(RequestError, match="send application/json or application/octet-stream"):
        check_content_type(content_type)


def test_rejects_nan_in_binary_data() -> None:
    values = np.full((1, 1, 8, 8), np.nan, dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": values.nbytes},
                }
            ]
        }
    )
    with pytest.raises(RequestError, match="NaN") as caught:
        decode(header + values.tobytes(), header_length=len(header))
    assert caught.value.reason == "non_finite"


@pytest.mark.parametrize(("size", "tail"), [(255, 256), (256, 100), ("256", 256)])
def test_rejects_binary_data_of_the_wrong_size(size: object, tail: int) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    with pytest.raises(RequestError, match="binary_data_size") as caught:
        decode(header + b"\0" * tail, header_length=len(header))
    assert caught.value.reason == "data_size_mismatch"


def test_rejects_a_header_length_beyond_the_body() -> None:
    with pytest.raises(RequestError, match="does not fit"):
        decode(body(), header_length=10_000)
    with pytest.raises(RequestError, match="must be an integer"):
        parse_header_length("ten")
    assert parse_header_length(None) is None
    assert parse_header_length("12") == 12


def test_encodes_json_outputs_with_label_as_argmax(pixels: npt.NDArray[np.float32]) -> None:
    request = decode(body({"shape": [5, 1, 8, 8], "data": pixels.ravel().tolist()}, id="r"))
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=5).astype(np.float32)
    embedding = rng.random((5, 16)).astype(np.float32)
    payload, header_length = encode_infer_response(
        SIGNATURE, request, output_tensors(probabilities, embedding)
    )
    assert header_length is None
    response = orjson.loads(payload)
    assert response["model_name"] == "digits"
    assert response["model_version"] == "3"
    assert response["id"] == "r"
    probs, label, embedding_output = response["outputs"]
    assert embedding_output["shape"] == [5, 16]
    assert (probs["name"], probs["datatype"], probs["shape"]) == ("probabilities", "FP32", [5, 10])
    # orjson writes float32's shortest repr, which reads back to exactly the same float32.
    np.testing.assert_array_equal(np.float32(probs["data"]), probabilities.ravel())
    assert label["datatype"] == "INT64"
    assert label["shape"] == [5]
    assert label["data"] == probabilities.argmax(axis=1).tolist()


def test_encodes_binary_outputs_after_the_json_header() -> None:
    request = InferRequest(
        "r",
        np.zeros((2, 1, 8, 8), np.float32),
        (RequestedOutput("probabilities", True), RequestedOutput("embedding", False)),
    )
    probabilities = np.array([[0.1] * 9 + [0.1], [0.0] * 9 + [1.0]], dtype=np.float32)
    embedding = np.ones((2, 16), dtype=np.float32)
    payload, header_length = encode_infer_response(
        SIGNATURE, request, output_tensors(probabilities, embedding)
    )
    assert header_length is not None
    header = orjson.loads(payload[:header_length])
    first, second = header["outputs"]
    assert first["parameters"] == {"binary_data_size": probabilities.nbytes}
    assert "data" not in first
    assert second["data"] == [1.0] * 32
    decoded = np.frombuffer(payload[header_length:], dtype="<f4").reshape(2, 10)
    np.testing.assert_array_equal(decoded, probabilities)


def test_encodes_the_predict_answer_for_one_image() -> None:
    probabilities = np.full(10, 0.05, dtype=np.float32)
    probabilities[7] = 0.55
    answer = encode_predict_response(SIGNATURE, "r1", probabilities)
    assert {key: answer[key] for key in ("request_id", "model_name", "model_version")} == {
        "request_id": "r1",
        "model_name": "digits",
        "model_version": "3",
    }
    assert (answer["label"], answer["class_name"]) == (7, "7")
    assert answer["confidence"] == pytest.approx(0.55)
    assert list(answer["probabilities"]) == list(SIGNATURE.class_names)
    assert answer["probabilities"]["0"] == pytest.approx(0.05)


def test_model_metadata_names_tensors_and_classes() -> None:
    metadata = model_metadata(SIGNATURE)
    assert metadata["name"] == "digits"
    assert metadata["versions"] == ["3"]
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label", "embedding"]
    assert metadata["parameters"]["class_names"][3] == "3"


def test_server_request_ids_are_unique_url_safe_and_sort_by_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sorted ids go in at the end of the log's request-id index (see `new_request_id`)."""
    clock = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 1_000_000))
    monkeypatch.setattr(protocol.time, "time_ns", lambda: next(clock))  # 1 ms per id
    ids = [new_request_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    monkeypatch.setattr(protocol.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    same_millisecond = {new_request_id() for _ in range(2000)}
    assert len(same_millisecond) == 2000  # told apart by their random half
