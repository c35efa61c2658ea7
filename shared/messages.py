"""Celery protocol-2 messages: what a valid envelope and a valid tag request look like.

Stock Celery workers crash or loop on some malformed envelopes (see README, "Bad messages").
stilltag checks every message here first and parks what it cannot use, so one bad message
never stops a worker.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from shared.constants import TAG_TASK


class BadMessage(ValueError):
    """The message cannot be used; the text says what is wrong with it."""


def check_envelope(raw: bytes | str) -> tuple[dict | None, str | None]:
    """Parse a raw broker payload; returns ``(envelope, None)`` or ``(None, reason)``."""
    try:
        envelope = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(envelope, dict):
        return None, f"envelope is a {type(envelope).__name__}, not an object"
    headers = envelope.get("headers")
    props = envelope.get("properties")
    problems = []
    body = envelope.get("body")
    if not isinstance(body, str):
        problems.append("no body")
    else:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            problems.append("body is not base64")
    if envelope.get("content-type") != "application/json":
        problems.append(f"content-type is {envelope.get('content-type')!r}, not 'application/json'")
    if not isinstance(headers, dict):
        problems.append("no headers")
    else:
        if not isinstance(headers.get("task"), str):
            problems.append("no headers.task")
        if not isinstance(headers.get("id"), str) or not headers.get("id"):
            problems.append("no headers.id")
    if not isinstance(props, dict):
        problems.append("no properties")
    else:
        if not isinstance(props.get("delivery_tag"), str) or not props.get("delivery_tag"):
            problems.append("no properties.delivery_tag")
        if not isinstance(props.get("delivery_info"), dict):
            problems.append("no properties.delivery_info")
        if props.get("body_encoding", "base64") != "base64":
            problems.append(f"properties.body_encoding is {props.get('body_encoding')!r}, not 'base64'")
    if problems:
        return None, "broken envelope: " + "; ".join(problems)
    return envelope, None


def decode_body(envelope: dict) -> Any:
    """The JSON value inside a checked envelope's base64 body."""
    try:
        return json.loads(base64.b64decode(envelope["body"], validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"body is not base64 of JSON: {exc}") from None


def parse_tag_request(task: str | None, body: Any) -> int:
    """The image ID of a ``stilltag.tag`` request, from the task name and decoded body."""
    if task != TAG_TASK:
        raise BadMessage(f"task {task!r} does not belong on a tagging queue (expected {TAG_TASK!r})")
    if not (isinstance(body, list) and len(body) == 3):
        raise BadMessage("body must be [args, kwargs, embed] (Celery protocol 2)")
    args, kwargs, _embed = body
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise BadMessage("body must be [args, kwargs, embed] with a list and an object")
    if args and kwargs:
        raise BadMessage(f"give the image ID once: args {args!r} and kwargs {kwargs!r}")
    if kwargs:
        if set(kwargs) != {"image_id"}:
            raise BadMessage(f"unexpected keyword arguments {sorted(kwargs)}; the only one is image_id")
        args = [kwargs["image_id"]]
    if len(args) != 1:
        raise BadMessage(f"stilltag.tag takes exactly one argument, the image ID; got {len(args)}")
    image_id = args[0]
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise BadMessage(f"image ID must be an integer, got {image_id!r}")
    if image_id < 0:
        raise BadMessage(f"image ID must not be negative, got {image_id}")
    return image_id
