"""The send request's form body (gateway.signalwire.client.form_body): what urlencode writes,
and what the SignalWire simulator reads back over HTTP."""

from __future__ import annotations

import urllib.parse

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.signalwire.client import SignalWireClient, form_body
from testsupport.harness import API_TOKEN, PROJECT_ID
from testsupport.harness import SimulatorServer as Simulator

# Presigned S3 URLs, callback URLs, numbers: the characters the quick path handles, and others.
_TEXT = st.text(st.sampled_from("aZ09_.~-:/?=&%+ #@!*'();,$[]\"<>\\^`{|}é€\U0001f4e0\n\t\r")
                | st.characters(exclude_categories=("Cs",)), max_size=60)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_TEXT, _TEXT, max_size=8))
def test_form_body_is_what_urlencode_writes(fields: dict[str, str]) -> None:
    assert form_body(fields) == urllib.parse.urlencode(fields).encode("ascii")


async def test_a_send_reaches_signalwire_with_its_fields_as_given() -> None:
    sim = Simulator(callback_delay_s=0.05)
    sim.state.suppress_callbacks = True
    await sim.start()
    client = SignalWireClient(space_url=sim.url, project_id=PROJECT_ID, api_token=API_TOKEN,
                              timeout_s=10.0)
    await client.start()
    try:
        media = ("http://127.0.0.1:1/b/odd%20name+é.pdf?X-Amz-Credential=AK%2F2025%2Fs3"
                 "&X-Amz-Date=20251206T054640Z&X-Amz-Signature=0a1b")
        callback = "http://127.0.0.1:1/signalwire/status/q7Zt3k9L~m2+Xv8_x-1?a=b&c=%41"
        fax = await client.send_fax(to="+15552010010", from_="+15557654321", media_url=media,
                                    quality="fine", ttl_min=60, status_callback=callback)
        assert fax.sid
        [sent] = sim.state.send_requests
        assert sent == {"To": "+15552010010", "From": "+15557654321", "MediaUrl": media,
                        "Quality": "fine", "Ttl": "60", "StatusCallback": callback,
                        "StatusCallbackMethod": "POST"}
    finally:
        await client.stop()
        await sim.stop()
