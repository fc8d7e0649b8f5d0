"""Compare smartserve.protocol with Breezy's own v3 codec, in one process.

Four figures: small messages per second (a ``get`` request and its
100-byte response, encoded, and decoded), and MB/s for a response
carrying 1 MiB in 64 KiB body chunks, encoded, and decoded from 64 KiB
reads. Each is the median of several runs, ours and Breezy's alternating;
the ratio (ours / Breezy's, goal 1.5 or more) is the median of the ratios
of back-to-back runs. Within a run, the figure is the median batch of
small messages or the median bulk message, so that time the scheduler
gives to other processes does not count.

Each codec is used as it is meant to be: Breezy builds a requester, a
responder and a decoder per message, and that is timed; our connections
are reused across messages, and ``start_next_cycle`` is timed. The
``b"".join`` that hands Breezy's written pieces to its decoder is timed
too, as it stands for our ``receive_data``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
from time import perf_counter

import breezy
from breezy.bzr.smart import message
from breezy.bzr.smart import protocol as breezy_protocol
from breezy.bzr.smart import request as breezy_request

from smartserve.protocol import (
    NEED_DATA,
    BodyChunk,
    Connection,
    EndOfMessage,
    Request,
    Response,
    Role,
)

GET_ARGS = (b"get", b"branch/.bzr/branch/last-revision")
OK_ARGS = (b"ok",)
SMALL_BODY = b"1 revision-id-of-the-tip-of-the-branch\n" + b"x" * 60
BULK_CHUNK_SIZE = 64 * 1024
BULK_CHUNKS = [bytes([n]) * BULK_CHUNK_SIZE for n in range(16)]
BULK_SIZE = sum(map(len, BULK_CHUNKS))
READ_SIZE = 64 * 1024
# Breezy's responder always sends this header; ours sends the same.
RESPONSE_HEADERS = {b"Software version": breezy.__version__.encode()}


class _Collector:
    """The medium request Breezy's requester writes to; keeps the bytes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.accept_bytes = self.chunks.append

    def finished_writing(self) -> None:
        pass


class _Recorder(message.MessageHandler):
    """A Breezy message handler that keeps every part, as our events do."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list = []

    def headers_received(self, headers):
        self.headers = headers

    def byte_part_received(self, byte):
        self.parts.append(byte)

    def bytes_part_received(self, data):
        self.parts.append(data)

    def structure_part_received(self, structure):
        self.parts.append(structure)

    def end_received(self):
        self.parts.append(None)


def _drain(conn: Connection) -> list:
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if type(event) is EndOfMessage:
            return events


# Small messages ---------------------------------------------------------


def small_ours(batch: int) -> tuple[float, float]:
    """Seconds to encode, and to decode, ``batch`` request/response pairs."""
    clients = [Connection(Role.CLIENT) for _ in range(batch)]
    servers = [Connection(Role.SERVER) for _ in range(batch)]
    end = EndOfMessage()
    t0 = perf_counter()
    requests = [client.send(Request(GET_ARGS)) + client.send(end) for client in clients]
    t1 = perf_counter()
    for server, data in zip(servers, requests):
        server.receive_data(data)
        while type(server.next_event()) is not EndOfMessage:
            pass
    t2 = perf_counter()
    responses = [
        server.send(Response(OK_ARGS, headers=RESPONSE_HEADERS))
        + server.send(BodyChunk(SMALL_BODY))
        + server.send(end)
        for server in servers
    ]
    t3 = perf_counter()
    for client, server, data in zip(clients, servers, responses):
        client.receive_data(data)
        while type(client.next_event()) is not EndOfMessage:
            pass
        client.start_next_cycle()
        server.start_next_cycle()
    t4 = perf_counter()
    return (t1 - t0) + (t3 - t2), (t2 - t1) + (t4 - t3)


def small_breezy(batch: int) -> tuple[float, float]:
    """Seconds for Breezy to encode, and to decode, ``batch`` pairs.

    Breezy builds a requester, a responder and a decoder per message (a
    decoder reads one message only), so building them is timed, as our
    ``start_next_cycle`` is.
    """
    collectors = [_Collector() for _ in range(batch)]
    responses: list[list[bytes]] = [[] for _ in range(batch)]
    requester_class = breezy_protocol.ProtocolThreeRequester
    responder_class = breezy_protocol.ProtocolThreeResponder
    decoder_class = breezy_protocol.ProtocolThreeDecoder
    response_class = breezy_request.SuccessfulSmartServerResponse
    t0 = perf_counter()
    for collector in collectors:
        requester_class(collector).call(*GET_ARGS)
    t1 = perf_counter()
    for collector in collectors:
        decoder_class(_Recorder(), expect_version_marker=True).accept_bytes(
            b"".join(collector.chunks)
        )
    t2 = perf_counter()
    for written in responses:
        responder_class(written.append).send_response(response_class(OK_ARGS, body=SMALL_BODY))
    t3 = perf_counter()
    for written in responses:
        decoder_class(_Recorder(), expect_version_marker=True).accept_bytes(b"".join(written))
    t4 = perf_counter()
    return (t1 - t0) + (t3 - t2), (t2 - t1) + (t4 - t3)


# Bulk bodies ------------------------------------------------------------


def _server_after_request() -> Connection:
    server = Connection(Role.SERVER)
    client = Connection(Role.CLIENT)
    server.receive_data(client.send(Request(GET_ARGS)) + client.send(EndOfMessage()))
    _drain(server)
    return server


def _client_after_request() -> Connection:
    client = Connection(Role.CLIENT)
    client.send(Request(GET_ARGS))
    client.send(EndOfMessage())
    return client


def bulk_encode_ours() -> tuple[float, bytes]:
    """Seconds to encode the bulk response with ``send_with_data_passthrough``."""
    server = _server_after_request()
    send = server.send_with_data_passthrough
    t0 = perf_counter()
    out = send(Response(OK_ARGS, headers=RESPONSE_HEADERS))
    for chunk in BULK_CHUNKS:
        out += send(BodyChunk(chunk))
    out += send(EndOfMessage())
    elapsed = perf_counter() - t0
    return elapsed, b"".join(out)


def bulk_encode_ours_copying() -> tuple[float, bytes]:
    """Seconds to encode the bulk response with plain ``send``."""
    server = _server_after_request()
    send = server.send
    t0 = perf_counter()
    out = [send(Response(OK_ARGS, headers=RESPONSE_HEADERS))]
    for chunk in BULK_CHUNKS:
        out.append(send(BodyChunk(chunk)))
    out.append(send(EndOfMessage()))
    elapsed = perf_counter() - t0
    return elapsed, b"".join(out)


def bulk_encode_breezy() -> tuple[float, bytes]:
    """Seconds for Breezy's responder to encode the bulk response."""
    out: list[bytes] = []
    responder = breezy_protocol.ProtocolThreeResponder(out.append)
    response = breezy_request.SuccessfulSmartServerResponse(
        OK_ARGS, body_stream=iter(BULK_CHUNKS)
    )
    t0 = perf_counter()
    responder.send_response(response)
    elapsed = perf_counter() - t0
    return elapsed, b"".join(out)


def bulk_decode_ours(reads: list[bytes]) -> float:
    """Seconds to decode the bulk response from ``reads``."""
    client = _client_after_request()
    t0 = perf_counter()
    body = 0
    for data in reads:
        client.receive_data(data)
        for event in _drain(client):
            if type(event) is BodyChunk:
                body += len(event.data)
    elapsed = perf_counter() - t0
    assert body == BULK_SIZE, body
    return elapsed


def bulk_decode_breezy(reads: list[bytes]) -> float:
    """Seconds for Breezy's decoder to decode the bulk response from ``reads``."""
    recorder = _Recorder()
    decoder = breezy_protocol.ProtocolThreeDecoder(recorder, expect_version_marker=True)
    t0 = perf_counter()
    for data in reads:
        decoder.accept_bytes(data)
    elapsed = perf_counter() - t0
    body = sum(len(part) for part in recorder.parts if isinstance(part, bytes) and len(part) > 1)
    assert body == BULK_SIZE, body
    return elapsed


# Driver -----------------------------------------------------------------


def _paired_medians(ours, theirs, repeats: int) -> tuple[float, float, float]:
    """Medians of ours, of theirs, and of their ratio, from alternating runs.

    Each ratio compares two runs made back to back, so a load change on the
    machine during the benchmark moves both sides of it.
    """
    ours_samples, theirs_samples, ratios = [], [], []
    for _ in range(repeats):
        gc.collect()
        ours_value = ours()
        gc.collect()
        theirs_value = theirs()
        ours_samples.append(ours_value)
        theirs_samples.append(theirs_value)
        ratios.append(ours_value / theirs_value)
    return statistics.median(ours_samples), statistics.median(theirs_samples), statistics.median(ratios)


def _check_same_bytes() -> bytes:
    """Both encoders must produce the same bulk bytes, or the race is unfair."""
    _, ours = bulk_encode_ours()
    _, copying = bulk_encode_ours_copying()
    _, theirs = bulk_encode_breezy()
    if not ours == copying == theirs:
        sys.exit("error: our bulk encoding differs from Breezy's")
    return theirs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="runs per figure (median)")
    parser.add_argument("--batch", type=int, default=1000, help="small messages per batch")
    parser.add_argument("--small-rounds", type=int, default=15, help="batches per run (median)")
    parser.add_argument("--bulk-rounds", type=int, default=100, help="bulk messages per run")
    args = parser.parse_args(argv)
    print("$ " + shlex.join(["python", *sys.argv]))
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"python {sys.version.split()[0]}, breezy {breezy.__version__}, load average {load}")

    stream = _check_same_bytes()
    reads = [stream[i : i + READ_SIZE] for i in range(0, len(stream), READ_SIZE)]

    def per_second(run, index):
        return lambda: args.batch / statistics.median(
            run(args.batch)[index] for _ in range(args.small_rounds)
        )

    def mb_per_second(run):
        return lambda: BULK_SIZE / 1e6 / statistics.median(run() for _ in range(args.bulk_rounds))

    rows = [
        ("small messages encoded /s", per_second(small_ours, 0), per_second(small_breezy, 0)),
        ("small messages decoded /s", per_second(small_ours, 1), per_second(small_breezy, 1)),
        (
            "1 MiB body encoded, MB/s",
            mb_per_second(lambda: bulk_encode_ours()[0]),
            mb_per_second(lambda: bulk_encode_breezy()[0]),
        ),
        (
            "1 MiB body decoded, MB/s",
            mb_per_second(lambda: bulk_decode_ours(reads)),
            mb_per_second(lambda: bulk_decode_breezy(reads)),
        ),
    ]
    print(f"{'figure':<28}{'smartserve':>14}{'breezy':>14}{'ratio':>8}")
    worst = None
    for name, ours, theirs in rows:
        ours_value, theirs_value, ratio = _paired_medians(ours, theirs, args.repeats)
        worst = ratio if worst is None else min(worst, ratio)
        print(f"{name:<28}{ours_value:>14,.0f}{theirs_value:>14,.0f}{ratio:>8.2f}")
    copying, _, copying_ratio = _paired_medians(
        mb_per_second(lambda: bulk_encode_ours_copying()[0]),
        mb_per_second(lambda: bulk_encode_breezy()[0]),
        args.repeats,
    )
    print(f"(1 MiB body encoded with plain send(): {copying:,.0f} MB/s, ratio {copying_ratio:.2f})")
    print(f"lowest ratio: {worst:.2f} (goal: 1.50)")


if __name__ == "__main__":
    main()
