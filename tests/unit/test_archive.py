"""The bounded archive reader (jobs/archive.py), on hand-made hostile archives. The builders at
the top are shared with tests/integration/test_hostile_uploads.py."""

import io
import os
import struct
import tarfile
import zipfile

import pytest

from jobs.archive import ArchiveError, ArchiveLimits, archive_kind, extract_archive, list_archive, normalize_name, scan_archive

SMALL = ArchiveLimits(max_entries=50, max_total_bytes=4 * 1024 * 1024, max_ratio=50.0, cpu_seconds=20,
                      memory_bytes=512 * 1024**2, timeout_s=60)


# ---- builders (also used by the integration corpus) ---------------------------------------

def make_zip(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _patch_zip_headers(data: bytes, name: bytes, patch) -> bytes:
    """Applies patch(buf, header_start, kind) to the local and central headers of member `name`."""
    buf = bytearray(data)
    for signature, kind in ((b"PK\x03\x04", "local"), (b"PK\x01\x02", "central")):
        pos = 0
        while (pos := buf.find(signature, pos)) >= 0:
            offset = 30 if kind == "local" else 46
            length = struct.unpack_from("<H", buf, pos + (26 if kind == "local" else 28))[0]
            if bytes(buf[pos + offset: pos + offset + length]) == name:
                patch(buf, pos, kind)
            pos += 4
    return bytes(buf)


def zip_with_flag(entries: dict[str, bytes], name: str, flag: int) -> bytes:
    def patch(buf, pos, kind):
        at = pos + (6 if kind == "local" else 8)
        struct.pack_into("<H", buf, at, struct.unpack_from("<H", buf, at)[0] | flag)
    return _patch_zip_headers(make_zip(entries), name.encode(), patch)


def zip_encrypted(entries: dict[str, bytes], name: str) -> bytes:
    return zip_with_flag(entries, name, 0x1)


def zip_with_method(entries: dict[str, bytes], name: str, method: int) -> bytes:
    def patch(buf, pos, kind):
        struct.pack_into("<H", buf, pos + (8 if kind == "local" else 10), method)
    return _patch_zip_headers(make_zip(entries), name.encode(), patch)


def zip_bad_crc(entries: dict[str, bytes], name: str) -> bytes:
    """The member's stored bytes are changed after the CRC was written."""
    data = bytearray(make_zip(entries))
    target = entries[name]
    at = data.find(target)
    data[at + len(target) // 2] ^= 0xFF
    return bytes(data)


def zip_renamed_raw(entries: dict[str, bytes], name: str, raw: bytes) -> bytes:
    """The member's name bytes replaced by `raw` (same length) in both headers, no UTF-8 flag."""
    assert len(raw) == len(name.encode())

    def patch(buf, pos, kind):
        offset = 30 if kind == "local" else 46
        buf[pos + offset: pos + offset + len(raw)] = raw
    return _patch_zip_headers(make_zip(entries), name.encode(), patch)


def zip_overlapping(entries: dict[str, bytes], name: str, copies: int = 3) -> bytes:
    """Extra central-directory records that point at the same local header as `name` (the
    overlap trick of non-recursive zip bombs: one compressed kernel, many entries)."""
    data = make_zip(entries)
    eocd = data.rfind(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    directory = data[cd_offset:cd_offset + cd_size]
    pos = 0
    records = []
    while pos < len(directory):
        n, m, k = struct.unpack_from("<HHH", directory, pos + 28)
        records.append(directory[pos:pos + 46 + n + m + k])
        pos += 46 + n + m + k
    original = next(r for r in records if r[46:46 + struct.unpack_from("<H", r, 28)[0]] == name.encode())
    extra = []
    for i in range(copies):
        alias = f"{i:0{len(name) - 4}d}.wav".encode()[: len(name)].ljust(len(name), b"x")
        extra.append(original[:46] + alias + original[46 + len(name):])
    new_directory = b"".join(records + extra)
    end = bytearray(data[eocd:])
    struct.pack_into("<HHII", end, 8, count + copies, count + copies, len(new_directory), cd_offset)
    return data[:cd_offset] + new_directory + bytes(end)


def zip_symlink(entries: dict[str, bytes], link: str, target: str) -> bytes:
    buffer = io.BytesIO(make_zip(entries))
    with zipfile.ZipFile(buffer, "a") as zf:
        info = zipfile.ZipInfo(link)
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, target)
    return buffer.getvalue()


def zip_bomb(zero_bytes: int, name: str = "bomb.wav") -> bytes:
    return make_zip({name: bytes(zero_bytes)}, zipfile.ZIP_DEFLATED)


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz", fmt=tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def tar_link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def tar_special(name: str, kind) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def _header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar  \0"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def tar_negative_size(good: list[tuple[str, bytes]] = ()) -> bytes:
    """A member whose base-256 size is -512: tarfile 3.11.7 computes the next header's offset as
    this very header's, so getmembers() reads it again and again, forever (gh-130577)."""
    body = b""
    for name, data in good:
        body += _header(name.encode(), b"%011o\0" % len(data)) + data + bytes(-len(data) % 512)
    body += _header(b"evil.wav", b"\xff" + (256**11 - 512).to_bytes(11, "big")) + bytes(1024)
    return zlib_gzip(body + bytes(1024))


def tar_pax_digits(good: list[tuple[str, bytes]] = (), digits: int = 200_000) -> bytes:
    """A pax header of nothing but digits: quadratic in tarfile 3.11.7's header regex (CVE-2024-6232)."""
    payload = b"1" * digits
    body = _header(b"././@PaxHeader", b"%011o\0" % len(payload), b"x") + payload + bytes(-len(payload) % 512)
    body += _header(b"a.wav", b"%011o\0" % 4) + b"data" + bytes(508)
    for name, data in good:
        body += _header(name.encode(), b"%011o\0" % len(data)) + data + bytes(-len(data) % 512)
    return zlib_gzip(body + bytes(1024))


def zlib_gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


# ---- reading ------------------------------------------------------------------------------

def refused(data: bytes, limits=SMALL, says: str = "", entry: str | None = None, too_large: bool | None = None) -> ArchiveError:
    with pytest.raises(ArchiveError) as err:
        list_archive(io.BytesIO(data), limits)
    assert says.lower() in err.value.message.lower(), err.value
    if entry is not None:
        assert err.value.entry == entry, err.value
    if too_large is not None:
        assert err.value.too_large is too_large, err.value
    return err.value


def test_a_plain_zip_and_tar_gz_are_listed():
    listing = list_archive(io.BytesIO(make_zip({"clips/a.wav": b"a" * 10, "b.wav": b"bb"})), SMALL)
    assert listing.kind == "zip"
    assert listing.files["clips/a.wav"].size == 10 and listing.files["b.wav"].size == 2
    tar = make_tar([tar_file("./clips/a.wav", b"abc"), tar_file("b.wav", b"")])
    listing = list_archive(io.BytesIO(tar), SMALL)
    assert (listing.kind, listing.compression) == ("tar", "gzip")
    assert sorted(listing.files) == ["b.wav", "clips/a.wav"]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_and_compressions_as_tar_writes_them(mode, fmt):
    long_name = "deep/" * 30 + "clip-\u00e9.wav"  # > 100 bytes: a ustar prefix, a GNU long name or a pax path
    data = make_tar([tar_file(long_name, b"x" * 700), tar_file("short.wav", b"y")], mode=mode, fmt=fmt)
    assert archive_kind(io.BytesIO(data)) == "tar"
    files = list_archive(io.BytesIO(data), SMALL).files
    assert files[long_name].size == 700 and files["short.wav"].size == 1


def test_names_are_spelled_one_way():
    assert normalize_name("./a\\b//c.wav") == "a/b/c.wav"
    for bad in ("/etc/passwd", "../x.wav", "a/../../x.wav", "C:/x.wav", "a\0b.wav", "x" * 300):
        with pytest.raises(ValueError):
            normalize_name(bad)


@pytest.mark.parametrize(
    ("data", "says", "entry"),
    [
        (make_zip({"ok.wav": b"x", "../escape.wav": b"x"}), "stay inside", "../escape.wav"),
        (make_zip({"ok.wav": b"x", "/abs.wav": b"x"}), "must be relative", "/abs.wav"),
        (make_zip({"C:/win.wav": b"x"}), "must be relative", "C:/win.wav"),
        (make_zip({"a.wav": b"x", "./a.wav": b"y"}), "appears twice", "a.wav"),
        (make_zip({"a": b"x", "a/b.wav": b"y"}), "also the folder", "a"),
        (make_tar([tar_file("ok.wav", b"x"), tar_link("evil", "/etc/passwd")]), "link", "evil"),
        (make_tar([tar_file("ok.wav", b"x"), tar_link("hard", "ok.wav", tarfile.LNKTYPE)]), "link", "hard"),
        (make_tar([tar_special("dev", tarfile.CHRTYPE)]), "device", "dev"),
        (make_tar([tar_special("pipe", tarfile.FIFOTYPE)]), "fifo", "pipe"),
        (zip_symlink({"ok.wav": b"x"}, "evil.wav", "/etc/passwd"), "link", "evil.wav"),
        (zip_encrypted({"a.wav": b"secret"}, "a.wav"), "encrypted", "a.wav"),
        (zip_with_method({"a.wav": b"data"}, "a.wav", 9), "compression method 9", "a.wav"),
        (zip_renamed_raw({"clip_X.wav": b"data"}, "clip_X.wav", b"clip_\xff.wav"), "not valid utf-8", None),
        (zip_overlapping({"kernel.wav": b"k" * 1000, "other.wav": b"o"}, "kernel.wav"), "overlaps", None),
    ],
)
def test_entries_that_are_refused_before_anything_is_read(data, says, entry):
    refused(data, says=says, entry=entry, too_large=False)


def test_utf8_flagged_name_that_is_not_utf8():
    data = zip_with_flag({"clip_X.wav": b"d"}, "clip_X.wav", 0x800)
    data = data.replace(b"clip_X.wav", b"clip_\xff.wav")
    refused(data, says="not valid utf-8")


def test_zip_name_with_nul_is_refused():
    # zipfile itself silently cuts a name at NUL; the reader refuses it.
    data = zip_renamed_raw({"clip_X.wav": b"d"}, "clip_X.wav", b"clip_\0.wav")
    refused(data, says="NUL")


def test_zip_bomb_by_ratio_and_by_total():
    bomb = zip_bomb(2 * 1024 * 1024)
    assert len(bomb) < 10_000
    refused(bomb, says="times its own size", too_large=True)
    big = make_zip({"a.bin": os.urandom(3 * 1024 * 1024), "b.bin": os.urandom(2 * 1024 * 1024)})
    refused(big, says="unpacks to more than 4194304 bytes", too_large=True)


def test_tar_gz_bomb_stops_without_unpacking_it_all():
    # 64 MiB of zeros in one member: refused on its header's size, before the data is inflated.
    import gzip

    header = _header(b"zeros.wav", b"%011o\0" % (64 * 1024 * 1024))
    body = gzip.compress(header + bytes(64 * 1024 * 1024) + bytes(1024), compresslevel=1)
    refused(body, says="unpacks to more than", too_large=True)


def test_too_many_entries():
    refused(make_zip({f"{i}.wav": b"" for i in range(51)}), says="more than 50 entries", too_large=True)
    refused(make_tar([tar_file(f"{i}.wav", b"") for i in range(51)]), says="more than 50 entries", too_large=True)


def test_negative_tar_size_is_refused_at_once():
    refused(tar_negative_size([("a.wav", b"abcd")]), says="negative size")


def test_pax_header_of_digits_is_refused_at_once():
    refused(tar_pax_digits(digits=500_000), says="pax header is malformed")


def test_truncated_tar_gz():
    data = make_tar([tar_file("a.wav", os.urandom(200_000))])
    refused(data[: len(data) // 2], says="truncated")


def test_truncated_plain_tar():
    data = make_tar([tar_file("a.wav", os.urandom(20_000))], mode="w")
    refused(data[:10_000], says="truncated")


def test_not_an_archive_and_gzip_that_is_not_a_tar():
    assert archive_kind(io.BytesIO(b"RIFF....WAVE")) is None
    refused(b"RIFF....WAVE" * 100, says="not a zip or tar")
    refused(zlib_gzip(b"just some text, not a tar" * 100), says="not a tar")


def test_bad_crc_is_found_when_the_member_is_read(tmp_path):
    data = zip_bad_crc({"a.wav": os.urandom(5000), "b.wav": b"fine"}, "a.wav")
    assert "a.wav" in list_archive(io.BytesIO(data), SMALL).files  # listing alone does not read data
    with pytest.raises(ArchiveError) as err:
        extract_archive(io.BytesIO(data), tmp_path, SMALL, {"a.wav"})
    assert err.value.entry == "a.wav" and "crc" in err.value.message.lower()
    with pytest.raises(ArchiveError, match="CRC"):
        scan_archive(io.BytesIO(data), SMALL)
    # An unnamed bad member is never read, so extracting the good one works.
    (tmp_path / "other").mkdir()
    extract_archive(io.BytesIO(data), tmp_path / "other", SMALL, {"b.wav"})
    assert (tmp_path / "other" / "b.wav").read_bytes() == b"fine"


def test_member_whose_header_understates_its_data(tmp_path):
    # The central and local sizes say 4 bytes; the data is 5000: the read stops and fails the CRC.
    entries = {"a.wav": os.urandom(5000)}

    def patch(buf, pos, kind):
        struct.pack_into("<I", buf, pos + (22 if kind == "local" else 24), 4)
    data = _patch_zip_headers(make_zip(entries), b"a.wav", patch)
    with pytest.raises(ArchiveError):
        extract_archive(io.BytesIO(data), tmp_path, SMALL)
    assert not (tmp_path / "a.wav").exists() or (tmp_path / "a.wav").stat().st_size <= 4


# ---- extracting ---------------------------------------------------------------------------

def test_extracts_only_the_named_members(tmp_path):
    data = make_zip({"clips/a.wav": b"a", "clips/b.wav": b"b", "dataset.csv": b"evil,csv"})
    result = extract_archive(io.BytesIO(data), tmp_path, SMALL, {"clips/a.wav", "not/there.wav"})
    assert result.names == ["clips/a.wav"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["clips", "clips/a.wav"]


def test_never_replaces_a_file_that_is_there(tmp_path):
    (tmp_path / "dataset.csv").write_text("audio,label\n")
    for data in (make_zip({"dataset.csv": b"evil"}), make_tar([tar_file("dataset.csv", b"evil")])):
        with pytest.raises(ArchiveError, match="replace"):
            extract_archive(io.BytesIO(data), tmp_path, SMALL)
        assert (tmp_path / "dataset.csv").read_text() == "audio,label\n"


def test_never_writes_through_a_link_in_the_destination(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "clips").symlink_to(outside)
    with pytest.raises(ArchiveError, match="cannot be written"):
        extract_archive(io.BytesIO(make_zip({"clips/a.wav": b"a"})), dest, SMALL)
    assert list(outside.iterdir()) == []


def test_tar_extraction_writes_regular_files_with_plain_modes(tmp_path):
    info, data = tar_file("clips/run.sh", b"#!/bin/sh\n")
    info.mode = 0o6777  # setuid, setgid, world-writable
    extract_archive(io.BytesIO(make_tar([(info, data)])), tmp_path, SMALL)
    written = tmp_path / "clips" / "run.sh"
    assert written.read_bytes() == b"#!/bin/sh\n"
    assert oct(written.stat().st_mode & 0o7777) == oct(0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_scan_returns_heads_and_checks_every_member():
    data = make_zip({"m/config.json": b'{"a": 1}', "m/w.bin": b"\x80\x04rest", "m/x.safetensors": b"s" * 100})
    listing, heads = scan_archive(io.BytesIO(data), SMALL, [("config.json", 100), (".bin", 2)])
    assert heads == {"m/config.json": b'{"a": 1}', "m/w.bin": b"\x80\x04"}
    assert len(listing.files) == 3
    tar = make_tar([tar_file("m/config.json", b"{}" * 100)])
    assert scan_archive(io.BytesIO(tar), SMALL, [("config.json", 5)])[1] == {"m/config.json": b"{}{}{"}


# ---- the process bounds -------------------------------------------------------------------

def test_wall_clock_bound_is_enforced():
    limits = ArchiveLimits(**{**SMALL.__dict__, "timeout_s": 0.001})
    with pytest.raises(ArchiveError, match="took longer") as err:
        list_archive(io.BytesIO(make_zip({"a.wav": b"a"})), limits)
    assert err.value.too_large


def test_memory_bound_is_enforced():
    # 500 entries with 60 KB of extra field each: zipfile holds the directory and every extra in
    # memory (60 MB), which a 40 MB address space does not allow (the child itself starts in
    # about 16 MB); the child fails and the archive is refused. With room, the same is read.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(500):
            info = zipfile.ZipInfo(f"{i}.wav")
            info.extra = struct.pack("<HH", 0xCAFE, 60_000) + bytes(60_000)
            zf.writestr(info, b"")
    limits = ArchiveLimits(**{**SMALL.__dict__, "max_entries": 1000, "memory_bytes": 40 * 1024**2})
    with pytest.raises(ArchiveError, match="memory"):
        list_archive(io.BytesIO(buffer.getvalue()), limits)
    list_archive(io.BytesIO(buffer.getvalue()), ArchiveLimits(**{**SMALL.__dict__, "max_entries": 1000}))


def test_reads_a_path_an_open_file_and_a_buffer_alike(tmp_path):
    data = make_zip({"a.wav": b"a"})
    path = tmp_path / "a.zip"
    path.write_bytes(data)
    with path.open("rb") as fp:
        fp.seek(3)
        assert list_archive(fp, SMALL).files.keys() == {"a.wav"}
    assert list_archive(path, SMALL).files.keys() == list_archive(io.BytesIO(data), SMALL).files.keys()
