"""Broken Celery envelopes, made from the one good one (``bench.stack.tag_envelope``, built the way
the website does), and a raw LPUSH for them."""

from __future__ import annotations

import base64
import json

from bench.stack import tag_envelope


def lpush(client, queue: str, envelope) -> None:
    client.lpush(queue, envelope if isinstance(envelope, (str, bytes)) else json.dumps(envelope))


def broken_envelopes(image_id: int) -> dict[str, str | dict]:
    """Envelopes that lose messages or crash stock Celery workers (CELERY-FACTS.md), and worse."""
    good = tag_envelope(image_id)

    def without(path: str) -> dict:
        env = json.loads(json.dumps(good))
        *parents, last = path.split(".")
        target = env
        for p in parents:
            target = target[p]
        del target[last]
        return env

    two_element = json.loads(json.dumps(good))
    two_element["body"] = base64.b64encode(json.dumps([[image_id], {}]).encode()).decode()
    string_id = tag_envelope("12abc")
    wrong_task = tag_envelope(image_id, task="stilltag.retrain")
    two_args = json.loads(json.dumps(good))
    two_args["body"] = base64.b64encode(json.dumps([[image_id, 2], {}, {}]).encode()).decode()
    not_base64 = json.loads(json.dumps(good))
    not_base64["body"] = "%%% not base64 %%%"
    return {
        "not json": "this is not json {",
        "json list": json.dumps([1, 2, 3]),
        "no delivery_tag": without("properties.delivery_tag"),
        "no delivery_info": without("properties.delivery_info"),
        "no headers.id": without("headers.id"),
        "no content-type": without("content-type"),
        "two-element body": two_element,
        "non-integer id": string_id,
        "wrong task": wrong_task,
        "two arguments": two_args,
        "body not base64": not_base64,
    }
