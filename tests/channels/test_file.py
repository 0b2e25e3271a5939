"""The file channel on a real file system: atomic, idempotent, never outside its folder."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from channels import registry
from channels.base import (
    FHIR_JSON,
    HL7V2,
    HTML,
    JSON,
    PDF,
    TEXT,
    Channel,
    ChannelConfigError,
    ChannelContext,
    PermanentError,
    RetryableError,
)
from channels.file import FileChannel
from tests.channels.contract import ChannelContract, Received, envelope
from tests.helpers import wait_for

MakeChannel = Callable[..., Channel]
PAYLOAD = b"Referral for cardiology: see the attached summary.\n"


def visible(folder: Path) -> list[Path]:
    """What a pickup job would see: the non-hidden files, in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def make_channel(tmp_path: Path) -> MakeChannel:
    def make(directory: str | Path = "out", **settings: Any) -> Channel:
        raw = {"type": "file", "directory": str(directory), **settings}
        return registry.build("pickup", raw, ChannelContext(base_dir=tmp_path))

    return make


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_bytes(b"not a folder")
    return path


class TestFileContract(ChannelContract):
    type_name = "file"

    @pytest.fixture
    def contract_channel(self, make_channel: MakeChannel) -> Channel:
        # Zero-padded so that names sort by delivery id.
        return make_channel(filename="{delivery_id:08d}-{idempotency_key}.{ext}")

    @pytest.fixture
    def contract_received(self, tmp_path: Path) -> Received:
        async def received(n: int) -> list[bytes]:
            folder = tmp_path / "out"
            await wait_for(lambda: folder.is_dir() and len(visible(folder)) >= n, timeout=5)
            return [p.read_bytes() for p in visible(folder)]

        return received

    @pytest.fixture
    def contract_down_channel(self, make_channel: MakeChannel, afile: Path) -> Channel:
        return make_channel(afile / "sub")

    @pytest.fixture
    def contract_payload(self) -> tuple[bytes, str]:
        return PAYLOAD, TEXT


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "ext"),
    [(HL7V2, "hl7"), (FHIR_JSON, "json"), (JSON, "json"), (PDF, "pdf"), (HTML, "html"),
     (TEXT, "txt"), ("application/octet-stream", "bin")],
)  # fmt: skip
async def test_default_name_and_receipt(
    tmp_path: Path, make_channel: MakeChannel, content_type: str, ext: str
) -> None:
    receipt = await make_channel().send(envelope(PAYLOAD, content_type, delivery_id=42, key="k-1"))
    assert receipt.peer_reference == f"42-k-1.{ext}"
    assert (tmp_path / "out" / f"42-k-1.{ext}").read_bytes() == PAYLOAD


async def test_template_placeholders(tmp_path: Path, make_channel: MakeChannel) -> None:
    channel = make_channel(filename="{kind}_{referral_id}_{delivery_id:05d}.{ext}")
    receipt = await channel.send(envelope(PAYLOAD, PDF, delivery_id=3))
    assert receipt.peer_reference == "packet_0b7f8e36-0000-4000-8000-000000000001_00003.pdf"
    assert visible(tmp_path / "out") == [tmp_path / "out" / receipt.peer_reference]


@pytest.mark.parametrize(
    ("stem", "name"),
    [("referral-letter", "referral-letter.pdf"), ("letter.pdf", "letter.pdf"),
     ("letter.v2", "letter.v2.pdf")],
)  # fmt: skip
async def test_metadata_filename_replaces_the_stem(
    tmp_path: Path, make_channel: MakeChannel, stem: str, name: str
) -> None:
    receipt = await make_channel().send(envelope(PAYLOAD, PDF, metadata={"filename": stem}))
    assert receipt.peer_reference == name
    assert (tmp_path / "out" / name).read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "stem", ["../escape", "a/b", "a\\b", ".hidden", "..", "x\x00y", "tab\there", "a" * 300]
)
async def test_an_unsafe_metadata_filename_is_permanent(
    tmp_path: Path, make_channel: MakeChannel, stem: str
) -> None:
    with pytest.raises(PermanentError, match="metadata filename is not safe") as caught:
        await make_channel().send(envelope(PAYLOAD, PDF, metadata={"filename": stem}))
    assert stem not in caught.value.reason  # it may be built from patient data
    assert everything(tmp_path) == []


async def test_a_key_that_makes_an_unsafe_name_is_permanent(
    tmp_path: Path, make_channel: MakeChannel
) -> None:
    with pytest.raises(PermanentError, match="template is not safe"):
        await make_channel().send(envelope(PAYLOAD, PDF, key="../../etc/passwd"))
    assert everything(tmp_path) == []


# -- endpoints (sub-folders) ------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["clinic-a", "east/clinic-a"])
async def test_endpoint_is_a_sub_folder(
    tmp_path: Path, make_channel: MakeChannel, endpoint: str
) -> None:
    receipt = await make_channel().send(envelope(PAYLOAD, TEXT, endpoint=endpoint))
    assert (tmp_path / "out" / endpoint / receipt.peer_reference).read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "endpoint",
    ["..", "../up", "/abs", "/", "a/../b", "./a", ".hidden", "a\\b", "a/.b", "a//b", "a/"],
)
async def test_an_unsafe_endpoint_is_permanent(
    tmp_path: Path, make_channel: MakeChannel, endpoint: str
) -> None:
    with pytest.raises(PermanentError, match="endpoint"):
        await make_channel().send(envelope(PAYLOAD, TEXT, endpoint=endpoint))
    assert everything(tmp_path) == []


# -- atomic and idempotent ------------------------------------------------------------


async def test_a_reader_never_sees_a_partial_file(
    tmp_path: Path, make_channel: MakeChannel
) -> None:
    big = os.urandom(4 * 1024 * 1024)
    folder = tmp_path / "out"
    folder.mkdir()
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # a pickup job polling the folder as fast as it can
        while not done.is_set():
            for path in visible(folder):
                with contextlib.suppress(FileNotFoundError):
                    seen.add(path.stat().st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for n in range(8):
            await make_channel(fsync=False).send(envelope(big, PDF, key=f"k-{n}"))
    finally:
        done.set()
        watcher.join(10)
    assert seen <= {len(big)}
    assert [p.read_bytes() == big for p in visible(folder)] == [True] * 8
    assert everything(folder) == [f"1-k-{n}.pdf" for n in range(8)]  # no temp file left


async def test_same_key_twice_rewrites_the_same_file(
    tmp_path: Path, make_channel: MakeChannel
) -> None:
    channel = make_channel()
    first = await channel.send(envelope(b"first Referral", TEXT, attempt=1))
    second = await channel.send(envelope(b"second Referral", TEXT, attempt=2))
    assert first.peer_reference == second.peer_reference
    assert everything(tmp_path / "out") == [first.peer_reference]
    assert (tmp_path / "out" / first.peer_reference).read_bytes() == b"second Referral"


async def test_a_failed_write_leaves_no_temp_file(
    tmp_path: Path, make_channel: MakeChannel
) -> None:
    # A folder squats on the final name: the rename fails, and the temp must go.
    (tmp_path / "out" / "1-k.txt").mkdir(parents=True)
    with pytest.raises(RetryableError, match="cannot write into"):
        await make_channel().send(envelope(PAYLOAD, TEXT, key="k"))
    assert everything(tmp_path / "out") == ["1-k.txt"]


# -- the folder -------------------------------------------------------------------------


async def test_a_folder_under_a_file_is_retryable(afile: Path, make_channel: MakeChannel) -> None:
    with pytest.raises(RetryableError, match=r"ENOTDIR") as caught:
        await make_channel(afile / "sub").send(envelope(PAYLOAD, TEXT))
    assert str(afile / "sub") in caught.value.reason
    assert afile.read_bytes() == b"not a folder"


async def test_create_false_needs_the_folder(tmp_path: Path, make_channel: MakeChannel) -> None:
    channel = make_channel(create=False)
    with pytest.raises(RetryableError, match="does not exist"):
        await channel.send(envelope(PAYLOAD, TEXT))
    with pytest.raises(RetryableError, match="does not exist"):
        await channel.send(envelope(PAYLOAD, TEXT, endpoint="clinic-a"))
    (tmp_path / "out").mkdir()
    receipt = await channel.send(envelope(PAYLOAD, TEXT))
    assert (tmp_path / "out" / receipt.peer_reference).read_bytes() == PAYLOAD


def test_relative_directory_starts_at_the_config_folder(tmp_path: Path) -> None:
    channel = registry.build(
        "p", {"type": "file", "directory": "spool/out"}, ChannelContext(base_dir=tmp_path)
    )
    assert isinstance(channel, FileChannel)
    assert channel.directory == tmp_path / "spool" / "out"
    absolute = registry.build(
        "p", {"type": "file", "directory": str(tmp_path / "abs")}, ChannelContext()
    )
    assert isinstance(absolute, FileChannel)
    assert absolute.directory == tmp_path / "abs"


@pytest.mark.parametrize(
    ("filename", "problem"),
    [
        ("{patient}.{ext}", "unknown placeholder {patient}"),
        ("{delivery_id!r}.{ext}", "unknown placeholder"),
        ("{}.{ext}", "unknown placeholder"),
        ("{kind:08d}.{ext}", "does not format"),
        ("out/{delivery_id}.{ext}", "path separator"),
        (".{delivery_id}", "starts with a dot"),
        ("", "at least 1 character"),
    ],
)
def test_bad_templates_are_config_errors(filename: str, problem: str) -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate({"type": "file", "directory": "out", "filename": filename})
    assert any(p.startswith("filename:") and problem in p for p in caught.value.problems), (
        caught.value.problems
    )


def test_directory_is_required() -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate({"type": "file"})
    assert any(p.startswith("directory:") for p in caught.value.problems)
