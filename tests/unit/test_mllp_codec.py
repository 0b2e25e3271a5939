"""The sans-IO MLLP decoder: every framing edge case by name, then properties under splits.

The property tests compare the decoder, fed a stream in arbitrary pieces, with a small
whole-stream reference model written from the MLLP rules (VT starts a frame, FS CR ends
it, VT inside a frame abandons it, anything between frames is junk).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.protocol import mllp
from engine.protocol.mllp import END, START, Event, Frame, FrameDecoder, Junk, Oversize, encode

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MSG = b"MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20261123101500||ORM^O01|C1|P|2.5.1\rPID|1||42\r"
MSG2 = b"MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20261123101501||SIU^S12|C2|P|2.5.1\r"


def feed_all(
    chunks: Iterable[bytes], max_frame_bytes: int = 10 * 1024 * 1024, *, close: bool = True
) -> list[Event]:
    decoder = FrameDecoder(max_frame_bytes)
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    if close:
        events += decoder.close()
    return events


def bytewise(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def reference(stream: bytes, max_frame_bytes: int, prefix_bytes: int) -> list[Event]:
    """What a decoder that sees the whole stream at once, then closes, must report."""
    events: list[Event] = []
    junk = 0
    i, n = 0, len(stream)
    while i < n:
        vt = stream.find(START, i)
        if vt < 0:
            junk += n - i
            break
        junk += vt - i
        if junk:
            events.append(Junk(junk, "outside_frame"))
            junk = 0
        body = vt + 1
        end = stream.find(END, body)
        restart = stream.find(START, body)
        if restart >= 0 and (end < 0 or restart < end):
            if restart > body:
                events.append(Junk(restart - body, "abandoned_frame"))
            i = restart
            continue
        if end < 0:
            if n > body:
                events.append(Junk(n - body, "abandoned_frame"))
            i = n
            break
        payload = stream[body:end]
        if len(payload) > max_frame_bytes:
            events.append(Oversize(prefix=payload[:prefix_bytes], size=len(payload)))
        else:
            events.append(Frame(payload))
        i = end + 2
    if junk:
        events.append(Junk(junk, "outside_frame"))
    return events


# -- named edge cases --------------------------------------------------------------------


def test_encode_wraps_payload_in_vt_and_fs_cr() -> None:
    assert encode(b"abc") == b"\x0babc\x1c\r"


def test_single_frame_in_one_read() -> None:
    assert feed_all([encode(MSG)]) == [Frame(MSG)]


def test_single_frame_fed_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    stream = encode(MSG)
    for i, chunk in enumerate(bytewise(stream)):
        events = decoder.feed(chunk)
        if i < len(stream) - 1:
            assert events == [], f"event before the frame ended (byte {i})"
            assert decoder.in_frame
        else:
            assert events == [Frame(MSG)]
    assert not decoder.in_frame
    assert decoder.buffered == 0
    assert decoder.close() == []


def test_empty_payload_is_a_frame() -> None:
    assert feed_all([b"\x0b\x1c\r"]) == [Frame(b"")]


def test_several_frames_in_one_read_are_all_delivered() -> None:
    stream = encode(MSG) + encode(MSG2) + encode(MSG)
    assert feed_all([stream]) == [Frame(MSG), Frame(MSG2), Frame(MSG)]


def test_end_block_split_between_fs_and_cr() -> None:
    stream = encode(MSG)
    assert feed_all([stream[:-1], stream[-1:]]) == [Frame(MSG)]


def test_end_block_in_its_own_read() -> None:
    assert feed_all([START + MSG, END]) == [Frame(MSG)]


def test_start_block_in_its_own_read() -> None:
    assert feed_all([START, MSG + END]) == [Frame(MSG)]


def test_fs_without_cr_is_payload() -> None:
    payload = b"A\x1cB\x1c\x1c"
    assert feed_all([encode(payload)]) == [Frame(payload)]
    assert feed_all(bytewise(encode(payload))) == [Frame(payload)]


def test_fs_last_in_read_then_non_cr_stays_payload() -> None:
    assert feed_all([b"\x0bAB\x1c", b"CD\x1c\r"]) == [Frame(b"AB\x1cCD")]


def test_trailing_lf_after_end_block_is_junk_and_next_frame_survives() -> None:
    stream = encode(MSG) + b"\n" + encode(MSG2) + b"\r\n"
    assert feed_all([stream]) == [
        Frame(MSG),
        Junk(1, "outside_frame"),
        Frame(MSG2),
        Junk(2, "outside_frame"),
    ]


def test_junk_before_first_frame_is_reported_when_the_frame_starts() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"hello") == []
    assert not decoder.in_frame
    assert decoder.feed(b"!!" + encode(MSG)) == [Junk(7, "outside_frame"), Frame(MSG)]


def test_junk_between_frames_in_one_read_loses_no_frame() -> None:
    stream = encode(MSG) + b"\x00\xffGARBAGE\r" + encode(MSG2)
    assert feed_all([stream]) == [Frame(MSG), Junk(10, "outside_frame"), Frame(MSG2)]


def test_only_junk_is_reported_on_close() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x1c\r\n") == []
    assert decoder.close() == [Junk(3, "outside_frame")]
    assert decoder.close() == []


def test_vt_inside_a_frame_abandons_it_as_junk() -> None:
    stream = b"\x0bPARTIAL" + encode(MSG)
    assert feed_all([stream]) == [Junk(7, "abandoned_frame"), Frame(MSG)]


def test_vt_inside_a_frame_across_reads() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x0bPART") == []
    assert decoder.buffered == 4
    assert decoder.feed(b"IAL" + encode(MSG)) == [Junk(7, "abandoned_frame"), Frame(MSG)]


def test_vt_right_after_vt_is_an_empty_abandoned_frame_without_event() -> None:
    assert feed_all([b"\x0b" + encode(MSG)]) == [Frame(MSG)]


def test_fs_then_vt_abandons_the_frame_including_the_fs() -> None:
    assert feed_all([b"\x0bAB\x1c" + encode(MSG2)]) == [Junk(3, "abandoned_frame"), Frame(MSG2)]


def test_close_with_partial_frame_reports_abandoned_junk() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x0bMSH|^~") == []
    assert decoder.in_frame
    assert decoder.buffered == 6
    assert decoder.close() == [Junk(6, "abandoned_frame")]
    assert not decoder.in_frame
    assert decoder.buffered == 0


def test_close_with_partial_frame_ending_in_fs() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x0bAB\x1c")
    assert decoder.close() == [Junk(3, "abandoned_frame")]


def test_close_right_after_start_block_reports_nothing() -> None:
    decoder = FrameDecoder()
    decoder.feed(START)
    assert decoder.in_frame
    assert decoder.close() == []


def test_decoder_is_usable_after_close() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x0bpartial")
    decoder.close()
    assert decoder.feed(encode(MSG)) == [Frame(MSG)]


def test_frame_at_exactly_the_limit_is_accepted() -> None:
    payload = b"x" * 10
    assert feed_all([encode(payload)], 10) == [Frame(payload)]


def test_frame_at_the_limit_with_end_block_split_is_accepted() -> None:
    # The FS at the end of a read may be the first half of the end block: it must not
    # count towards the limit until the next byte says whether it is payload.
    payload = b"x" * 10
    stream = encode(payload)
    assert feed_all([stream[:-1], stream[-1:]], 10) == [Frame(payload)]
    assert feed_all(bytewise(stream), 10) == [Frame(payload)]


def test_frame_one_over_the_limit_is_oversize() -> None:
    payload = b"x" * 11
    assert feed_all([encode(payload)], 10) == [Oversize(prefix=payload, size=11)]
    assert feed_all(bytewise(encode(payload)), 10) == [Oversize(prefix=payload, size=11)]


def test_oversize_keeps_only_a_bounded_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mllp, "OVERSIZE_PREFIX_BYTES", 16)
    payload = MSG * 4
    decoder = FrameDecoder(32)
    events = decoder.feed(encode(payload))
    assert events == [Oversize(prefix=payload[:16], size=len(payload))]
    assert decoder.buffered == 0


def test_oversize_frame_memory_stays_bounded_while_discarding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mllp, "OVERSIZE_PREFIX_BYTES", 16)
    decoder = FrameDecoder(32)
    decoder.feed(START)
    for _ in range(100):
        assert decoder.feed(b"y" * 100) == []
        assert decoder.buffered <= 32
    assert decoder.feed(END) == [Oversize(prefix=b"y" * 16, size=10_000)]


def test_oversize_is_reported_once_at_end_of_frame_and_next_frame_decodes() -> None:
    decoder = FrameDecoder(8)
    assert decoder.feed(b"\x0b" + b"z" * 20) == []
    assert decoder.in_frame
    events = decoder.feed(b"zz\x1c\r" + encode(b"ok"))
    assert events == [Oversize(prefix=b"z" * 22, size=22), Frame(b"ok")]


def test_oversize_end_block_split_between_fs_and_cr() -> None:
    payload = b"q" * 30
    stream = encode(payload)
    assert feed_all([stream[:-1], stream[-1:]], 8) == [Oversize(prefix=payload, size=30)]


def test_oversize_payload_ending_in_fs_counts_that_fs() -> None:
    payload = b"q" * 30 + b"\x1c"
    stream = encode(payload)
    expected = [Oversize(prefix=payload, size=31)]
    assert feed_all([stream], 8) == expected
    assert feed_all(bytewise(stream), 8) == expected


def test_close_during_oversize_reports_abandoned_junk() -> None:
    decoder = FrameDecoder(4)
    decoder.feed(b"\x0b" + b"w" * 12)
    assert decoder.close() == [Junk(12, "abandoned_frame")]


def test_vt_inside_oversize_frame_abandons_it_like_any_frame() -> None:
    # Same answer whether the VT arrives in the read that crossed the limit or later.
    stream = b"\x0b" + b"A" * 8 + encode(b"BB")
    expected = [Junk(8, "abandoned_frame"), Frame(b"BB")]
    assert feed_all([stream], 5) == expected
    assert feed_all(bytewise(stream), 5) == expected


def test_max_frame_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        FrameDecoder(0)


def test_buffered_reports_bytes_held_for_unfinished_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"junk")
    assert decoder.buffered == 0
    decoder.feed(b"\x0b12345")
    assert decoder.buffered == 5
    decoder.feed(b"\x1c\r")
    assert decoder.buffered == 0


# -- properties ---------------------------------------------------------------------------

payloads = st.binary(max_size=60).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))
junks = st.binary(max_size=8).map(lambda b: b.replace(b"\x0b", b""))
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@FAST
@given(frames=st.lists(st.tuples(junks, payloads), min_size=1, max_size=5), cut=cuts)
def test_every_split_of_a_multi_frame_stream_yields_the_same_frames(
    frames: list[tuple[bytes, bytes]], cut: list[int]
) -> None:
    stream = b"".join(junk + encode(payload) for junk, payload in frames)
    events = feed_all(split_at(stream, cut))
    assert [e.payload for e in events if isinstance(e, Frame)] == [p for _, p in frames]
    junk = [e for e in events if isinstance(e, Junk)]
    assert all(e.reason == "outside_frame" for e in junk)
    assert sum(e.size for e in junk) == sum(len(j) for j, _ in frames)


@FAST
@given(frames=st.lists(payloads, min_size=1, max_size=4))
def test_byte_at_a_time_equals_one_read(frames: list[bytes]) -> None:
    stream = b"".join(encode(p) for p in frames)
    assert feed_all(bytewise(stream)) == feed_all([stream]) == [Frame(p) for p in frames]


# A hostile alphabet: the framing bytes, LF, and two ordinary bytes, so VT-in-frame,
# FS-without-CR, oversize and junk all happen often.
hostile = st.lists(st.sampled_from(b"\x0b\x1c\r\nAM"), max_size=80).map(bytes)


@FAST
@given(
    stream=hostile,
    cut=cuts,
    max_frame_bytes=st.integers(min_value=1, max_value=12),
    prefix_bytes=st.integers(min_value=1, max_value=6),
)
def test_hostile_stream_matches_reference_under_any_split(
    stream: bytes, cut: list[int], max_frame_bytes: int, prefix_bytes: int
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mllp, "OVERSIZE_PREFIX_BYTES", prefix_bytes)
        got = feed_all(split_at(stream, cut), max_frame_bytes)
    assert got == reference(stream, max_frame_bytes, prefix_bytes)


@FAST
@given(stream=hostile, max_frame_bytes=st.integers(min_value=1, max_value=12))
def test_hostile_stream_byte_at_a_time_matches_reference(
    stream: bytes, max_frame_bytes: int
) -> None:
    assert feed_all(bytewise(stream), max_frame_bytes) == reference(
        stream, max_frame_bytes, mllp.OVERSIZE_PREFIX_BYTES
    )


@FAST
@given(stream=hostile, cut=cuts)
def test_every_input_byte_is_accounted_for(stream: bytes, cut: list[int]) -> None:
    """Frames + envelopes + junk + oversize add up to the stream: nothing silently lost."""
    events = feed_all(split_at(stream, cut), 6)
    frames = [e for e in events if isinstance(e, Frame | Oversize)]
    accounted = sum(e.size for e in events if isinstance(e, Junk))
    accounted += sum(len(e.payload) if isinstance(e, Frame) else e.size for e in frames)
    accounted += 3 * len(frames)  # VT + FS CR per completed frame
    accounted += stream.count(START) - len(frames)  # VTs that opened abandoned frames
    assert accounted == len(stream)
