"""Tests for muxpool.framing: sans-IO, so no sockets; every split point, Hypothesis, a corpus."""

from __future__ import annotations

import array
import json
import pathlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxpool.errors import LocalProtocolError, MessageTooLarge, ProtocolError, RemoteProtocolError
from muxpool.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FRAMERS,
    LengthFramer,
    LineFramer,
    RawFramer,
    make_framer,
)

CORPUS_DIR = pathlib.Path(__file__).parent / "corpus" / "framing"
NAMES = ["raw", "line", "length"]
STREAM_NAMES = ["line", "length"]  # framings whose messages survive any chunking
# Worst case a framer may hold: the line plus its "\r", or the header plus the body.
OVERHEAD = {"raw": 0, "line": 1, "length": 4}

# Messages each framing can carry, with the awkward cases in them.
SAMPLES = {
    "raw": [b"hello", b"\x00\xff\n\r", b"x" * 100],
    "line": [b"hello", b"", b"a\rb", b"\x00\xff", b"caf\xc3\xa9", b"", b"x" * 100],
    "length": [b"hello", b"", b"\x00\x00\x00\x05", b"a\nb\r\n", b"\xff" * 7, b"", b"x" * 100],
}

hsettings = settings(max_examples=150, deadline=None)


def feed_chunks(framer, chunks):
    """Feed every non-empty chunk (b"" would be EOF) and return all messages."""
    out = []
    for chunk in chunks:
        if chunk:
            out.extend(framer.feed(chunk))
    return out


def stream_of(name, messages, limit=DEFAULT_MAX_MESSAGE_SIZE):
    framer = make_framer(name, limit)
    return b"".join(framer.encode(m) for m in messages)


def split_at(data, points):
    points = sorted(points)
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def reference_decode(name, limit, data):
    """The obvious, slow decoder of a whole stream then EOF: (messages, error type or None)."""
    messages = []
    pos = 0
    if name == "line":
        while (nl := data.find(b"\n", pos)) >= 0:
            line = data[pos:nl]
            line = line[:-1] if line.endswith(b"\r") else line
            if len(line) > limit:
                return messages, MessageTooLarge
            messages.append(line)
            pos = nl + 1
        rest = data[pos:]
        if len(rest) > limit + 1 or (len(rest) == limit + 1 and not rest.endswith(b"\r")):
            return messages, MessageTooLarge
        return messages, (RemoteProtocolError if rest else None)
    assert name == "length"
    while len(data) - pos >= 4:
        (size,) = struct.unpack_from("!I", data, pos)
        if size > limit:
            return messages, MessageTooLarge
        if pos + 4 + size > len(data):
            break
        messages.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return messages, (RemoteProtocolError if pos < len(data) else None)


def run_to_eof(framer, chunks, limit_pending=None):
    """Feed chunks then EOF; return (messages, exception type or None), checking ``pending``."""
    messages = []
    try:
        for chunk in chunks:
            if chunk:
                got = framer.feed(chunk)
                assert all(type(m) is bytes for m in got)
                messages.extend(got)
                if limit_pending is not None:
                    assert framer.pending <= limit_pending
        messages.extend(framer.feed(b""))
    except ProtocolError as exc:
        assert framer.pending == 0
        # The first error kills the framer.
        with pytest.raises(RemoteProtocolError, match="dead"):
            framer.feed(b"more")
        return messages, type(exc)
    return messages, None


# --- round trips and split points ---------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_one_message_per_feed(name):
    framer = make_framer(name)
    for message in SAMPLES[name]:
        wire = framer.encode(message)
        if wire:  # raw framing cannot carry an empty message: b"" is EOF
            assert framer.feed(wire) == [message]
    assert framer.pending == 0


@pytest.mark.parametrize("name", STREAM_NAMES)
def test_many_messages_in_one_feed(name):
    framer = make_framer(name)
    messages = SAMPLES[name] * 3
    assert framer.feed(stream_of(name, messages)) == messages
    assert framer.pending == 0


@pytest.mark.parametrize("name", STREAM_NAMES)
def test_every_split_point_gives_the_same_messages(name):
    messages = SAMPLES[name][:6]
    data = stream_of(name, messages) + (b"a\r\n\r\n" if name == "line" else b"")
    expected = messages + ([b"a", b""] if name == "line" else [])
    for i in range(len(data) + 1):
        framer = make_framer(name)
        assert feed_chunks(framer, [data[:i], data[i:]]) == expected, f"split at {i}"
        assert framer.feed(b"") == []


@pytest.mark.parametrize("name", STREAM_NAMES)
def test_every_pair_of_split_points(name):
    messages = [b"ab", b"", b"c"]
    data = stream_of(name, messages)
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert feed_chunks(make_framer(name), split_at(data, [i, j])) == messages


@pytest.mark.parametrize("name", STREAM_NAMES)
def test_byte_by_byte(name):
    messages = SAMPLES[name]
    data = stream_of(name, messages)
    framer = make_framer(name)
    assert feed_chunks(framer, [data[i : i + 1] for i in range(len(data))]) == messages
    assert framer.pending == 0


def test_line_crlf_split_between_cr_and_lf():
    framer = LineFramer()
    assert framer.feed(b"abc\r") == []
    assert framer.pending == 4
    assert framer.feed(b"\ndef\r\n\n") == [b"abc", b"def", b""]


def test_line_strips_only_one_trailing_cr():
    assert LineFramer().feed(b"a\r\r\n\r\n\rb\n") == [b"a\r", b"", b"\rb"]


def test_length_header_is_big_endian_unsigned():
    framer = LengthFramer()
    assert framer.encode(b"abc") == b"\x00\x00\x00\x03abc"
    assert framer.encode(b"x" * 258)[:4] == b"\x00\x00\x01\x02"
    assert framer.feed(b"\x00\x00\x01\x02" + b"x" * 258) == [b"x" * 258]


def test_raw_each_chunk_is_one_message():
    framer = RawFramer()
    assert framer.feed(b"ab\ncd") == [b"ab\ncd"]
    assert framer.feed(b"\x00\x00\x00\x05") == [b"\x00\x00\x00\x05"]
    assert framer.pending == 0
    assert framer.encode(b"ab\n") == b"ab\n"


@pytest.mark.parametrize("name", NAMES)
def test_accepts_bytearray_and_memoryview_and_returns_bytes(name):
    wire = make_framer(name).encode(b"hello")
    for data in (bytearray(wire), memoryview(wire), memoryview(bytearray(b"??" + wire))[2:]):
        got = make_framer(name).feed(data)
        assert got == [b"hello"] and type(got[0]) is bytes
    for message in (bytearray(b"hello"), memoryview(b"hello")):
        encoded = make_framer(name).encode(message)
        assert encoded == wire and type(encoded) is bytes


def test_memoryview_of_wider_items_is_fed_as_bytes():
    words = array.array("H", [0x4142, 0x4344])
    assert RawFramer().feed(memoryview(words)) == [words.tobytes()]
    assert LengthFramer().encode(memoryview(words))[:4] == b"\x00\x00\x00\x04"


@pytest.mark.parametrize("name", STREAM_NAMES)
def test_feed_copies_what_it_keeps(name):
    # Callers recv_into one bytearray and reuse it: the framer must not keep a view of it.
    wire = make_framer(name).encode(b"hello")
    reused = bytearray(wire[:3])
    framer = make_framer(name)
    assert framer.feed(reused) == []
    reused[:] = b"XXX"
    assert framer.feed(wire[3:]) == [b"hello"]


@pytest.mark.parametrize("name", NAMES)
def test_callers_bytearray_stays_resizable_after_an_error(name):
    data = bytearray(b"\xff\xff\xff\xff" + b"z" * 20 if name == "length" else b"z" * 20)
    with pytest.raises(MessageTooLarge) as info:
        make_framer(name, 8).feed(data)
    assert info.value.limit == 8
    data.extend(b"more")  # BufferError if feed() left its view of ``data`` exported


# --- Hypothesis ---------------------------------------------------------------


def messages_for(name, limit):
    body = st.binary(max_size=limit)
    if name == "line":
        body = body.map(lambda b: b.replace(b"\n", b"").rstrip(b"\r"))
    if name == "raw":
        body = st.binary(min_size=1, max_size=limit)
    return st.lists(body, max_size=12)


@pytest.mark.parametrize("name", STREAM_NAMES)
@hsettings
@given(data=st.data(), limit=st.integers(1, 40))
def test_property_any_messages_any_chunking_round_trip(name, data, limit):
    messages = data.draw(messages_for(name, limit))
    wire = stream_of(name, messages, limit)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    framer = make_framer(name, limit)
    assert run_to_eof(framer, split_at(wire, points), limit + OVERHEAD[name]) == (messages, None)


@hsettings
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=10), limit=st.integers(1, 40))
def test_property_raw_returns_each_chunk_or_rejects_it(chunks, limit):
    framer = RawFramer(limit)
    for chunk in chunks:
        if len(chunk) > limit:
            with pytest.raises(MessageTooLarge):
                framer.feed(chunk)
            return
        assert framer.encode(chunk) == chunk
        assert framer.feed(chunk) == [chunk]
    assert framer.feed(b"") == []


@pytest.mark.parametrize("name", STREAM_NAMES)
@hsettings
@given(data=st.data(), limit=st.integers(1, 24))
def test_property_garbage_matches_the_reference_decoder_at_any_chunking(name, data, limit):
    # Only ProtocolError subclasses escape, pending stays bounded, and the outcome
    # (messages delivered, then error type) does not depend on how bytes arrive.
    wire = data.draw(
        st.one_of(
            st.binary(max_size=120),
            # Mostly-valid streams with the odd corrupt byte reach deeper states.
            st.lists(st.sampled_from([b"\n", b"\r", b"\x00", b"\x00\x00\x00", b"\x03", b"ab", b"\xff"]),
                     max_size=40).map(b"".join),
        )
    )
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    framer = make_framer(name, limit)
    got = run_to_eof(framer, split_at(wire, points), limit + OVERHEAD[name])
    assert got == reference_decode(name, limit, wire)


@hsettings
@given(chunks=st.lists(st.binary(max_size=60), max_size=10), limit=st.integers(1, 24))
def test_property_raw_garbage_raises_only_protocol_errors(chunks, limit):
    run_to_eof(RawFramer(limit), chunks, limit_pending=0)


# --- limits -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("limit", [1, 5, 64])
def test_exactly_max_accepted_max_plus_one_rejected(name, limit):
    framer = make_framer(name, limit)
    ok = b"m" * limit
    assert framer.feed(framer.encode(ok)) == [ok]
    too_big = b"m" * (limit + 1)
    wire = make_framer(name, limit + 1).encode(too_big)
    with pytest.raises(MessageTooLarge) as info:
        framer.feed(wire)
    assert info.value.limit == limit
    assert f"max_message_size={limit}" in str(info.value)


def test_line_limit_counts_the_message_not_the_crlf():
    framer = LineFramer(4)
    assert framer.feed(b"abcd\r") == []  # could still be a 4-byte line
    assert framer.feed(b"\n") == [b"abcd"]
    with pytest.raises(MessageTooLarge):
        LineFramer(4).feed(b"abcd\rx")


@pytest.mark.parametrize("length", [0x80000000, 0xFFFFFFFF, 9])
def test_length_rejects_announced_length_from_header_alone(length):
    framer = LengthFramer(8)
    header = struct.pack("!I", length)
    assert framer.feed(header[:3]) == []
    with pytest.raises(MessageTooLarge) as info:
        framer.feed(header[3:])  # no body byte was ever sent
    assert (info.value.limit, info.value.size) == (8, length)
    assert framer.pending == 0


def test_length_rejects_huge_header_in_one_feed():
    with pytest.raises(MessageTooLarge) as info:
        LengthFramer().feed(b"\xff\xff\xff\xff")
    assert info.value.size == 0xFFFFFFFF and info.value.limit == DEFAULT_MAX_MESSAGE_SIZE


def test_line_rejects_an_endless_line_without_buffering_it():
    framer = LineFramer(10)
    high_water = 0
    with pytest.raises(MessageTooLarge) as info:
        for _ in range(1000):
            framer.feed(b"abc")
            high_water = max(high_water, framer.pending)
    assert high_water <= 11
    assert info.value.limit == 10
    # One huge chunk without a newline is refused outright, not appended first.
    big = LineFramer(10)
    assert big.feed(b"x") == []
    with pytest.raises(MessageTooLarge):
        big.feed(b"z" * 10_000_000)
    assert big.pending == 0
    after_a_message = LineFramer(10)
    assert after_a_message.feed(b"a\n" + b"z" * 10_000_000) == [b"a"]
    assert after_a_message.pending == 0


def test_line_rejects_a_long_line_arriving_in_two_feeds():
    framer = LineFramer(8)
    assert framer.feed(b"12345") == []
    with pytest.raises(MessageTooLarge):
        framer.feed(b"6789\n")


@pytest.mark.parametrize(
    "name, good, bad",
    [
        ("line", b"one\r\ntwo\n", b"x" * 9 + b"\n"),
        ("length", b"\x00\x00\x00\x03one\x00\x00\x00\x03two", b"\x00\x00\x00\x09"),
    ],
)
def test_messages_before_a_violation_are_returned_and_the_error_comes_next(name, good, bad):
    framer = make_framer(name, 8)
    assert framer.feed(good + bad + b"trailing") == [b"one", b"two"]
    assert framer.pending == 0
    with pytest.raises(MessageTooLarge) as info:
        framer.feed(b"anything")
    assert info.value.limit == 8
    with pytest.raises(RemoteProtocolError, match="dead"):
        framer.feed(b"anything")


def test_pending_error_is_raised_even_by_eof():
    framer = LineFramer(4)
    assert framer.feed(b"ok\nxxxxxxxx") == [b"ok"]
    with pytest.raises(MessageTooLarge):
        framer.feed(b"")


# --- EOF and dead framers -----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_clean_eof_returns_nothing_and_can_repeat(name):
    framer = make_framer(name)
    assert framer.feed(b"") == []
    assert framer.feed(b"") == []


@pytest.mark.parametrize("name, partial", [("line", b"abc"), ("length", b"\x00\x00"), ("length", b"\x00\x00\x00\x05ab")])
def test_truncated_frame_at_eof(name, partial):
    framer = make_framer(name)
    assert framer.feed(partial) == []
    assert framer.pending == len(partial)
    with pytest.raises(RemoteProtocolError, match=f"truncated frame: {len(partial)} bytes pending at EOF") as info:
        framer.feed(b"")
    assert not isinstance(info.value, MessageTooLarge)


@pytest.mark.parametrize("name", NAMES)
def test_feeding_after_eof_raises(name):
    framer = make_framer(name)
    framer.feed(b"")
    with pytest.raises(RemoteProtocolError, match="dead"):
        framer.feed(b"late")


@pytest.mark.parametrize("name", NAMES)
def test_feeding_after_an_error_raises_and_chains_the_first_error(name):
    framer = make_framer(name, 2)
    wire = b"\x00\x00\x00\x09" if name == "length" else b"toolong\n"
    with pytest.raises(MessageTooLarge) as first:
        framer.feed(wire)
    for again in (b"ok", b""):
        with pytest.raises(RemoteProtocolError, match="dead") as info:
            framer.feed(again)
        assert info.value.__cause__ is first.value


# --- encode errors ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_encode_rejects_oversized_message(name):
    framer = make_framer(name, 4)
    assert framer.encode(b"abcd")
    with pytest.raises(LocalProtocolError, match="max_message_size=4") as info:
        framer.encode(b"abcde")
    assert info.value.limit == 4
    assert not isinstance(info.value, RemoteProtocolError)


@pytest.mark.parametrize("message", [b"a\nb", b"\n", b"ab\r"])
def test_line_encode_rejects_what_the_peer_would_misread(message):
    with pytest.raises(LocalProtocolError) as info:
        LineFramer().encode(message)
    assert info.value.limit == DEFAULT_MAX_MESSAGE_SIZE


@pytest.mark.parametrize("name", NAMES)
def test_str_is_a_type_error(name):
    framer = make_framer(name)
    with pytest.raises(TypeError, match="not str"):
        framer.encode("text")
    with pytest.raises(TypeError, match="not str"):
        framer.feed("text")
    with pytest.raises(TypeError, match="int"):
        framer.feed(5)  # bytes(5) would silently be five zero bytes


# --- construction and the name table ------------------------------------------


def test_make_framer_by_name():
    assert list(FRAMERS) == ["raw", "line", "length"]
    for name, cls in [("raw", RawFramer), ("line", LineFramer), ("length", LengthFramer)]:
        framer = make_framer(name, 77)
        assert type(framer) is cls and FRAMERS[name] is cls
        assert framer.name == name and framer.max_message_size == 77
    assert make_framer("line").max_message_size == DEFAULT_MAX_MESSAGE_SIZE == 1024 * 1024


def test_make_framer_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="'json'") as info:
        make_framer("json")
    assert all(name in str(info.value) for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [0, -1])
def test_max_message_size_must_be_positive(name, bad):
    with pytest.raises(ValueError, match="max_message_size"):
        FRAMERS[name](bad)


def test_length_limit_cannot_exceed_what_the_header_can_carry():
    assert LengthFramer(0xFFFFFFFF).max_message_size == 0xFFFFFFFF
    with pytest.raises(ValueError, match="4-byte header"):
        LengthFramer(0x1_0000_0000)


# --- corpus -------------------------------------------------------------------


def load_corpus():
    cases = []
    for path in sorted(CORPUS_DIR.glob("*.json")):
        for case in json.loads(path.read_text()):
            for chunking in [case["chunking"]] if "chunking" in case else ["whole", "bytewise"]:
                cases.append(pytest.param(case, chunking, id=f"{path.stem}-{case['name']}-{chunking}"))
    return cases


CORPUS = load_corpus()


def test_corpus_is_present_and_covers_every_framing():
    assert 30 <= len({(c.values[0]["framing"], c.values[0]["name"]) for c in CORPUS}) <= 60
    assert {c.values[0]["framing"] for c in CORPUS} == set(NAMES)


@pytest.mark.parametrize("case, chunking", CORPUS)
def test_corpus(case, chunking):
    data = bytes.fromhex(case["input_hex"])
    chunks = [data] if chunking == "whole" else [data[i : i + 1] for i in range(len(data))]
    framer = make_framer(case["framing"], case["max_message_size"])
    messages, error = run_to_eof(framer, chunks)
    expect = case["expect"]
    assert [m.hex() for m in messages] == expect.get("messages_hex", [])
    assert (error.__name__ if error else None) == expect.get("error")
