"""Celery protocol-2 envelopes built by hand, the way the website (Ruby, `redis` gem only) does."""

from __future__ import annotations

import base64
import json
import uuid


def tag_envelope(image_id, *, queue: str = "tagging", task: str = "stilltag.tag") -> dict:
    """The exact structure of the README's Ruby snippet."""
    task_id = str(uuid.uuid4())
    body = [[image_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "argsrepr": f"({image_id!r},)",
            "kwargsrepr": "{}",
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


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
