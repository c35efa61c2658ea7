import base64
import json

import pytest

from shared.messages import BadMessage, check_envelope, decode_body, parse_tag_request
from tests.envelopes import broken_envelopes, tag_envelope


def test_hand_built_envelope_is_valid_and_carries_the_id():
    env, reason = check_envelope(json.dumps(tag_envelope(42)))
    assert reason is None
    assert parse_tag_request(env["headers"]["task"], decode_body(env)) == 42


@pytest.mark.parametrize("name", ["not json", "json list", "no delivery_tag", "no delivery_info",
                                  "no headers.id", "no content-type", "body not base64"])
def test_transport_level_breakage_is_caught_before_kombu(name):
    raw = broken_envelopes(7)[name]
    env, reason = check_envelope(raw if isinstance(raw, str) else json.dumps(raw))
    assert env is None
    assert reason


@pytest.mark.parametrize(
    ("name", "match"),
    [("two-element body", r"\[args, kwargs, embed\]"), ("non-integer id", "must be an integer"),
     ("wrong task", "does not belong"), ("two arguments", "exactly one argument")],
)
def test_request_level_breakage_is_a_bad_message(name, match):
    env, reason = check_envelope(json.dumps(broken_envelopes(7)[name]))
    assert reason is None  # a well-formed envelope around a bad request
    with pytest.raises(BadMessage, match=match):
        parse_tag_request(env["headers"]["task"], decode_body(env))


def test_keyword_image_id_is_accepted_and_bools_are_not():
    assert parse_tag_request("stilltag.tag", [[], {"image_id": 5}, {}]) == 5
    with pytest.raises(BadMessage):
        parse_tag_request("stilltag.tag", [[True], {}, {}])
    with pytest.raises(BadMessage):
        parse_tag_request("stilltag.tag", [[-1], {}, {}])


def test_celery_client_message_has_the_same_shape(tmp_path):
    """What Celery's own producer writes passes the same checks (so both paths are one)."""
    from shared.celery_app import create_app
    from shared.config import Settings

    settings = Settings(data_dir=tmp_path)
    app = create_app(settings)
    app.send_task("stilltag.tag", args=[99], queue="tagging")
    # The filesystem broker keeps each message as the raw envelope a Redis list would hold.
    [stored] = (settings.data_dir / "broker" / "queue").iterdir()
    env, reason = check_envelope(stored.read_bytes())
    assert reason is None
    assert env["properties"]["body_encoding"] == "base64"
    assert env["properties"]["delivery_info"]["routing_key"] == "tagging"
    body = json.loads(base64.b64decode(env["body"], validate=True))  # the body travelled base64-encoded
    assert body[:2] == [[99], {}]
    assert decode_body(env) == body
    assert parse_tag_request(env["headers"]["task"], body) == 99
