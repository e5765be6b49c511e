"""Tensor bytes of the hot RPCs in protobuf's wire format: read in place, written with one copy.

Parsing a message copies each bytes field, reading the field copies it again, and building a
response copies an array into the message before serializing copies it once more. For vae.v1's
Encode and OIP's ModelInfer, whose tensors are most of a large call's bytes, the server instead:

- finds the tensor bytes in the received message (length-delimited fields of the encoding),
  parses the rest of the message as usual, and reads the tensors as views of the received bytes.
  A message whose tensor bytes are not one field where one is expected (a repeated or merged
  field, a malformed one) is parsed the ordinary way, so no message ever means something else;
- serializes a response without its tensor bytes and appends them as fields of their own (a
  message's fields may come in any order), so each array is copied once, into the reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError, Message

from vaeserve._proto import vae_pb2
from vaeserve.errors import RequestError

LEN = 2  # the wire type of bytes, strings and messages


def field_number(message: type[Message], name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


TENSOR_DATA = field_number(vae_pb2.Tensor, "data")


class WireError(ValueError):
    """Bytes that are not a well-formed message (the ordinary parser then says what is wrong)."""


class Field(NamedTuple):
    number: int
    key_start: int  # where the field's key begins
    start: int  # where its value begins
    end: int


@dataclass(frozen=True, slots=True)
class Received:
    """A request parsed without its tensor bytes, and those bytes as views of the message
    (``None``: the message was parsed the ordinary way, the bytes are in it)."""

    message: Any
    tensors: tuple[memoryview, ...] | None = None


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Bytes that are not the method's request message. gRPC would answer INTERNAL for a
    parser that raises; the handler answers INVALID_ARGUMENT saying what was wrong."""

    message: str
    error: str


def tolerant(parse: Callable[[bytes], Any], message: type[Message]) -> Callable[[bytes], Any]:
    """``parse``, with undecodable bytes handed on as ``Undecodable`` instead of raised."""

    def parse_or_flag(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            return Undecodable(message.DESCRIPTOR.full_name, str(exc) or "not a protobuf message")

    return parse_or_flag


def checked(request: Any) -> Any:
    """The request, or RequestError if its bytes were not the message."""
    if isinstance(request, Undecodable):
        raise RequestError(f"the request is not a valid {request.message} message ({request.error})")
    return request


@dataclass(frozen=True, slots=True)
class Reply:
    """A response whose tensor bytes are written from arrays after ``message``, which holds
    everything else: vae.v1 Tensor fields (field number, array), or entries of a repeated bytes
    field ``raw_field`` (OIP's raw outputs, each array's own bytes)."""

    message: Message
    tensors: tuple[tuple[int, np.ndarray], ...] = ()
    raw_field: int = 0
    raw_outputs: tuple[np.ndarray, ...] = ()

    @property
    def rows(self) -> int:
        arrays = [array for _, array in self.tensors] or list(self.raw_outputs)
        return int(arrays[0].shape[0]) if arrays else 0


def read_varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while i < end and shift < 64:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise WireError("truncated or overlong varint")


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int) -> bytes:
    return varint(number << 3 | LEN)


def length_delimited(buf: memoryview, start: int, end: int) -> list[Field]:
    """The length-delimited fields of the message in buf[start:end], others skipped."""
    fields, i = [], start
    while i < end:
        key_start = i
        tag, i = read_varint(buf, i, end)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, i = read_varint(buf, i, end)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == LEN:
            size, i = read_varint(buf, i, end)
            fields.append(Field(number, key_start, i, i + size))
            i += size
        else:
            raise WireError(f"wire type {wire_type}")
        if i > end:
            raise WireError("a field runs past the end of its message")
    return fields


def tensor_request(message: type[Message], tensor_field: int) -> Callable[[bytes], Received]:
    """A vae.v1 request parser: the Tensor ``tensor_field``'s data as a view."""

    def parse(raw: bytes) -> Received:
        try:
            return _tensor_request(raw, message, tensor_field)
        except WireError:
            return Received(message.FromString(raw))

    return parse


def _tensor_request(raw: bytes, message: type[Message], tensor_field: int) -> Received:
    buf = memoryview(raw)
    tensors = [f for f in length_delimited(buf, 0, len(buf)) if f.number == tensor_field]
    if len(tensors) != 1:
        return Received(message.FromString(raw))
    (tensor,) = tensors
    data = [f for f in length_delimited(buf, tensor.start, tensor.end) if f.number == TENSOR_DATA]
    if len(data) != 1:
        return Received(message.FromString(raw))
    (bytes_field,) = data
    rest = (tensor.end - tensor.start) - (bytes_field.end - bytes_field.key_start)
    stripped = b"".join(
        (
            buf[: tensor.key_start],
            key(tensor_field),
            varint(rest),
            buf[tensor.start : bytes_field.key_start],
            buf[bytes_field.end :],
        )
    )
    return Received(message.FromString(stripped), (buf[bytes_field.start : bytes_field.end],))


def repeated_bytes_request(message: type[Message], field: int) -> Callable[[bytes], Received]:
    """A request parser with the entries of the repeated bytes ``field`` as views, in order
    (OIP's ``raw_input_contents``)."""

    def parse(raw: bytes) -> Received:
        buf = memoryview(raw)
        try:
            spans = [f for f in length_delimited(buf, 0, len(buf)) if f.number == field]
        except WireError:
            spans = []
        if not spans:
            return Received(message.FromString(raw))
        pieces, at = [], 0
        for span in spans:
            pieces.append(buf[at : span.key_start])
            at = span.end
        pieces.append(buf[at:])
        views = tuple(buf[f.start : f.end] for f in spans)
        return Received(message.FromString(b"".join(pieces)), views)

    return parse


def serialize(reply: Reply | Message) -> bytes:
    if not isinstance(reply, Reply):
        return reply.SerializeToString()
    parts: list[bytes | memoryview] = [reply.message.SerializeToString()]
    for number, array in reply.tensors:
        parts.extend(_tensor_field(number, array))
    for array in reply.raw_outputs:
        data = memoryview(np.ascontiguousarray(array)).cast("B")  # its own datatype, as tobytes()
        parts.extend((key(reply.raw_field), varint(data.nbytes), data))
    return b"".join(parts)


def _tensor_field(number: int, array: np.ndarray) -> list[bytes | memoryview]:
    """A vae.v1 Tensor field: shape and dtype serialized as usual, then the data field."""
    # As codec.to_tensor: uint8 stays, anything else goes as little-endian float32, row-major.
    dtype = vae_pb2.DATA_TYPE_UINT8 if array.dtype == np.uint8 else vae_pb2.DATA_TYPE_FLOAT32
    if dtype == vae_pb2.DATA_TYPE_FLOAT32:
        array = array.astype("<f4", copy=False)
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    head = vae_pb2.Tensor(shape=array.shape, dtype=dtype).SerializeToString()
    head += key(TENSOR_DATA) + varint(data.nbytes)
    return [key(number), varint(len(head) + data.nbytes), head, data]
