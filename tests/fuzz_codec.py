"""Fuzz entry point for the MQTT codec, the WebSocket frame reader and the HTTP request path.

    pip install atheris && python tests/fuzz_codec.py [atheris/libFuzzer options]

Without atheris it runs each target once over a few seeds (a smoke check). Not part of
the pytest suite; any exception other than the module's own protocol errors is a bug.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vmqapi  # noqa: E402

_NODE = vmqapi.Node({"data_dir": tempfile.mkdtemp(prefix="vmqapi-fuzz-")})


def fuzz_codec(data: bytes) -> None:
    """Decode MQTT packets from arbitrary bytes: packets, need-more, or MalformedPacket only."""
    pos = 0
    try:
        while True:
            result = vmqapi.decode_packet(data, pos, 4096)
            if result is None:
                return
            packet, pos = result
            assert vmqapi.decode_packet(vmqapi.encode_packet(packet))[0] == packet
    except vmqapi.MalformedPacket:
        pass


def fuzz_websocket(data: bytes) -> None:
    """Read WebSocket frames from arbitrary bytes: frames, need-more, or WsError only."""
    pos = 0
    try:
        while (frame := vmqapi.ws_decode(data, pos, 4096)) is not None:
            pos = frame[3]
    except vmqapi.WsError:
        pass


def fuzz_http(data: bytes) -> None:
    """Run the pure request path on an arbitrary target and headers: never a 500."""
    text = data.decode("latin-1")
    target, _, rest = text.partition("\n")
    headers = dict(line.partition(":")[::2] for line in rest.split("\n") if ":" in line)
    request = vmqapi.Request("GET", "/api/v1/" + target, {k.lower(): v for k, v in headers.items()})
    assert vmqapi.handle_http(_NODE, request).status != 500


TARGETS = (fuzz_codec, fuzz_websocket, fuzz_http)


def one_input(data: bytes) -> None:
    """Dispatch on the first byte to one target."""
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


if __name__ == "__main__":
    try:
        import atheris
    except ImportError:
        for seed in (b"", b"\x00\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00", b"\x01\x82\x80abcd",
                     b"\x02session/show?--client_id=x\nAuthorization: Basic !!"):
            one_input(seed)
        print("atheris is not installed: ran each target once on its seeds")
    else:
        atheris.Setup(sys.argv, one_input)
        atheris.Fuzz()
