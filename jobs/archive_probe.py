"""The archive parser that runs in a child process (see jobs/archive.py, which starts it).

Untrusted zip and tar bytes are parsed only here, in a short-lived process that first caps its
own CPU time, address space and file sizes, so whatever a crafted archive does to the parser
(Python 3.11.7's tarfile and zipfile have known loops, quadratic paths and zip bombs) costs a
bounded amount and can only take this process down. The parent reads one bounded JSON answer.

Only the standard library is imported, and the script runs as `python -I -S archive_probe.py`:
the request comes as JSON on stdin, the answer goes as JSON to stdout.

Tar is read by the strict reader below, not by `tarfile`: 512-byte headers with verified
checksums, sizes that are never negative (so the next header is always further on), pax
records parsed linearly, and only regular files and folders accepted. Zip is read by `zipfile`
after checks of our own: entry count from the end record before the directory is loaded, no
encryption, only stored/deflate/bzip2/lzma, no two entries whose bytes overlap (the "zip bomb"
that reuses one compressed kernel), CRCs verified as members are read.
"""

import base64
import bz2
import gzip
import json
import lzma
import os
import signal
import stat
import struct
import sys
import zlib

BLOCK = 512
MAX_NAME_BYTES = 1024  # a whole member name
MAX_COMPONENT_BYTES = 255  # one folder or file name (NAME_MAX)
MAX_PAX_BYTES = 1024 * 1024  # one pax header's records
MAX_META_BYTES = 64 * 1024 * 1024  # all pax records and GNU long names together
MAX_NAMES_BYTES = 64 * 1024 * 1024  # all entry names together (bounds the answer)
COPY_CHUNK = 1024 * 1024
ZIP_METHODS = {0: "stored", 8: "deflate", 12: "bzip2", 14: "lzma"}

GZIP_MAGIC, BZIP2_MAGIC, XZ_MAGIC = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


class Refused(Exception):
    """The archive is refused: `message` says why, `entry` names the member, `too_large` marks a
    size bound (the API answers 413 for those, 422 for the rest)."""

    def __init__(self, message: str, entry: str | None = None, too_large: bool = False):
        super().__init__(message)
        self.message, self.entry, self.too_large = message, entry, too_large


# ---- names ---------------------------------------------------------------------------------

def normalize_name(name: str) -> str:
    """The one spelling of a member path, shared with the CSV's paths: backslashes become '/',
    '.' and empty parts go. Raises ValueError for a path that is absolute, climbs out ('..'),
    names a drive, holds NUL, or is too long. '' is the archive's root folder."""
    if "\0" in name:
        raise ValueError("holds a NUL character")
    path = name.replace("\\", "/")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError("must be relative and stay inside the archive")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ValueError(f"is longer than {MAX_NAME_BYTES} bytes")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES for part in parts):
        raise ValueError(f"has a folder or file name longer than {MAX_COMPONENT_BYTES} bytes")
    return "/".join(parts)


def _name(raw: bytes, shown: str | None = None) -> str:
    """The normalized name of raw member-name bytes, or Refused naming the entry as `shown`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("entry name is not valid UTF-8", entry=raw.decode("utf-8", "replace")) from None
    try:
        return normalize_name(text)
    except ValueError as err:
        raise Refused(f"path {str(err)}", entry=text) from None


class Checker:
    """Bounds over all entries, applied as they are read."""

    def __init__(self, limits: dict, archive_bytes: int):
        self.limits, self.archive_bytes = limits, max(archive_bytes, 1)
        self.entries: list[tuple[str, int, str]] = []
        self.kinds: dict[str, str] = {}
        self.total = self.names_bytes = 0

    def add(self, name: str, size: int, kind: str) -> None:
        limits = self.limits
        if len(self.entries) >= limits["max_entries"]:
            raise Refused(f"has more than {limits['max_entries']} entries", too_large=True)
        if name == "":
            if kind == "file":
                raise Refused("an entry has an empty name", entry=name)
            return  # the root folder itself ('./')
        if name in self.kinds:
            if kind == "dir" and self.kinds[name] == "dir":
                return  # a folder listed twice is harmless
            raise Refused("appears twice in the archive", entry=name)
        self.total += size
        if self.total > limits["max_total_bytes"]:
            raise Refused(f"unpacks to more than {limits['max_total_bytes']} bytes", entry=name, too_large=True)
        if self.total > limits["max_ratio"] * self.archive_bytes:
            raise Refused(
                f"unpacks to more than {limits['max_ratio']:g} times its own size of {self.archive_bytes} bytes "
                "(a compression bomb?)", entry=name, too_large=True)
        self.names_bytes += len(name) + 16
        if self.names_bytes > MAX_NAMES_BYTES:
            raise Refused(f"its entry names alone are over {MAX_NAMES_BYTES} bytes", too_large=True)
        self.kinds[name] = kind
        self.entries.append((name, size, kind))

    def finish(self) -> None:
        """A name may not be a file and also the folder of another entry."""
        for name, _, _ in self.entries:
            parent = name.rpartition("/")[0]
            while parent:
                if self.kinds.get(parent) == "file":
                    raise Refused("is a file and also the folder of another entry", entry=parent)
                parent = parent.rpartition("/")[0]


# ---- kinds ---------------------------------------------------------------------------------

def tar_checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum(struct.unpack("148b", block[:148])) + 8 * 32 + sum(struct.unpack("356b", block[156:]))
    return stored in (unsigned, signed)


def sniff(head: bytes) -> tuple[str, str | None] | None:
    """(kind, compression) judged by the first bytes only: ('zip', None), ('tar', 'gzip'|'bzip2'|
    'xz'|None), or None. A compressed file is only a tar candidate until its content is read."""
    if head.startswith(ZIP_MAGICS):
        return "zip", None
    if head.startswith(GZIP_MAGIC):
        return "tar", "gzip"
    if head.startswith(BZIP2_MAGIC):
        return "tar", "bzip2"
    if head.startswith(XZ_MAGIC):
        return "tar", "xz"
    if len(head) >= BLOCK and head[:BLOCK] != bytes(BLOCK) and tar_checksum_ok(head[:BLOCK]):
        return "tar", None
    return None


# ---- tar -----------------------------------------------------------------------------------

def _number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # base-256 (GNU): the top bit set, 0xff = negative
        if field[0] == 0xFF:
            raise Refused(f"a tar header has a negative {what}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text and not all(48 <= c <= 55 for c in text):
        raise Refused(f"a tar header has a malformed {what} field")
    return int(text or b"0", 8)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """'LEN KEY=VALUE\\n' records, read in one linear pass; anything malformed is refused."""
    records, pos = {}, 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the records
            if data[pos:].strip(b"\0"):
                raise Refused("a tar pax header is malformed")
            break
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits or not digits.isdigit():
            raise Refused("a tar pax header is malformed")
        length = int(digits)
        end = pos + length
        if length <= len(digits) + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise Refused("a tar pax header is malformed")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise Refused("a tar pax header is malformed")
        records[key] = value
        pos = end
    return records


class _Stream:
    """A sequential reader over the (decompressed) tar that bounds how far it may go."""

    def __init__(self, fileobj, cap: int):
        self.fileobj, self.cap, self.pos = fileobj, cap, 0

    def read(self, n: int) -> bytes:
        if self.pos + n > self.cap:
            raise Refused(f"unpacks to more than {self.cap} bytes of tar data", too_large=True)
        try:
            data = self.fileobj.read(n)
        except EOFError:
            raise Refused("compressed data is truncated") from None
        except (OSError, lzma.LZMAError, zlib.error, ValueError) as err:
            raise Refused(f"compressed data is corrupt ({err})") from None
        self.pos += len(data)
        return data

    def exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise Refused(f"tar is truncated in {what}")
        return data

    def copy(self, n: int, out, entry: str) -> None:
        while n > 0:
            data = self.read(min(n, COPY_CHUNK))
            if not data:
                raise Refused("tar is truncated in this member's data", entry=entry)
            if out is not None:
                out.write(data)
            n -= len(data)


def _open_tar(path: str, compression: str | None):
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bzip2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def tar_members(path: str, compression: str | None, limits: dict, checker: Checker):
    """Yields (name, size, kind, stream) for each file and folder, with the stream positioned at
    the member's data; the caller reads or skips exactly `size` bytes of it (then padding is
    skipped here). Every bound is checked before the data is read."""
    cap = limits["max_total_bytes"] + 4 * BLOCK * (limits["max_entries"] + 2) + MAX_META_BYTES
    with _open_tar(path, compression) as raw:
        stream = _Stream(raw, cap)
        pax: dict[bytes, bytes] = {}
        longname: bytes | None = None
        meta = headers = 0
        while True:
            block = stream.read(BLOCK)
            if not block:
                if headers == 0:
                    raise Refused("is empty: not a tar archive")
                return  # end of file without the end-of-archive blocks: tolerated, as tar does
            if len(block) < BLOCK:
                raise Refused("tar is truncated in a header")
            if block == bytes(BLOCK):
                if headers == 0:
                    raise Refused("not a tar archive (starts with an empty block)")
                return
            if not tar_checksum_ok(block):
                raise Refused("not a tar archive" if headers == 0 else "a tar header has a bad checksum (corrupt or truncated)")
            headers += 1
            if headers > 3 * limits["max_entries"] + 3:
                raise Refused(f"has more than {limits['max_entries']} entries", too_large=True)
            kind = block[156:157]
            size = _number(block[124:136], "size")
            padded = -(-size // BLOCK) * BLOCK
            if kind in (b"x", b"g", b"L"):
                limit = MAX_PAX_BYTES if kind != b"L" else 4 * MAX_NAME_BYTES
                meta += size
                if size > limit or meta > MAX_META_BYTES:
                    raise Refused("a tar pax header or long name is too large", too_large=True)
                data = stream.exact(padded, "a pax header")[:size]
                if kind == b"L":
                    longname = data.split(b"\0", 1)[0]
                    continue
                records = _pax_records(data)
                if any(key.startswith(b"GNU.sparse") for key in records):
                    raise Refused("holds a sparse file; only regular files are allowed")
                if kind == b"g":
                    if b"path" in records or b"size" in records:
                        raise Refused("a global tar pax header sets a path or size, which is not supported")
                    continue
                pax = records
                continue
            # A member header: its name, and the size from a pax record when there is one.
            if b"path" in pax:
                raw_name = pax[b"path"]
            elif longname is not None:
                raw_name = longname
            else:
                raw_name = block[0:100].split(b"\0", 1)[0]
                if block[257:263] == b"ustar\x00":  # POSIX ustar: a prefix before the name
                    prefix = block[345:500].split(b"\0", 1)[0]
                    if prefix:
                        raw_name = prefix + b"/" + raw_name
            if b"size" in pax:
                if not pax[b"size"].isdigit():
                    raise Refused("a tar pax header has a malformed size")
                size = int(pax[b"size"])
                padded = -(-size // BLOCK) * BLOCK
            pax, longname = {}, None
            shown = raw_name.decode("utf-8", "replace")
            if kind in (b"1", b"2", b"K"):
                raise Refused("is a link; only regular files are allowed", entry=shown)
            if kind in (b"3", b"4", b"6"):
                raise Refused("is a device or fifo; only regular files are allowed", entry=shown)
            if kind == b"\0" and raw_name.endswith(b"/"):
                kind = b"5"
            if kind not in (b"0", b"\0", b"7", b"5"):
                raise Refused(f"has an unsupported tar entry type {kind!r}; only regular files and folders are allowed", entry=shown)
            name = _name(raw_name, shown)
            if kind == b"5":
                if size:
                    raise Refused("a tar folder entry has data", entry=shown)
                checker.add(name, 0, "dir")
                yield name, 0, "dir", stream
                continue
            checker.add(name, size, "file")
            before = stream.pos
            yield name, size, "file", stream
            if stream.pos != before + size:
                raise RuntimeError("caller did not consume the member")  # a bug here, not in the input
            stream.exact(padded - size, "padding")


def tar_walk(path: str, compression: str | None, limits: dict, archive_bytes: int, on_file=None) -> Checker:
    checker = Checker(limits, archive_bytes)
    for name, size, kind, stream in tar_members(path, compression, limits, checker):
        if kind == "file":
            out = on_file(name, size) if on_file else None
            try:
                stream.copy(size, out, name)
            finally:
                if out is not None:
                    out.close()
    checker.finish()
    return checker


# ---- zip -----------------------------------------------------------------------------------

def _zip_open(path: str, limits: dict, archive_bytes: int):
    import zipfile

    with open(path, "rb") as fp:
        try:
            end = zipfile._EndRecData(fp)
        except OSError:
            end = None
    if end is None:
        raise Refused("not a zip archive (no end-of-directory record)")
    if end[zipfile._ECD_ENTRIES_TOTAL] > limits["max_entries"]:
        raise Refused(f"has more than {limits['max_entries']} entries", too_large=True)
    try:
        zf = zipfile.ZipFile(path)
    except UnicodeDecodeError:
        raise Refused("entry name is not valid UTF-8") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, struct.error, EOFError) as err:
        raise Refused(f"not a readable zip archive ({err})") from None
    infos = zf.infolist()
    if len(infos) > limits["max_entries"]:
        raise Refused(f"has more than {limits['max_entries']} entries", too_large=True)
    return zf, infos


def zip_check(path: str, limits: dict, archive_bytes: int):
    """Opens the zip and checks every entry; returns (ZipFile, [(name, info)] of files, Checker)."""
    zf, infos = _zip_open(path, limits, archive_bytes)
    checker = Checker(limits, archive_bytes)
    files, spans = [], []
    with open(path, "rb") as fp:
        for info in infos:
            shown = info.orig_filename
            if "\0" in shown:
                raise Refused("entry name holds a NUL character", entry=shown.split("\0")[0])
            raw = shown.encode("utf-8") if info.flag_bits & 0x800 else shown.encode("cp437")
            name = _name(raw, shown)
            # Unix file type bits, where the zip was made on Unix and states them.
            mode = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
            if info.flag_bits & 0x1 or info.flag_bits & 0x40:
                raise Refused("is encrypted; upload an archive without a password", entry=name)
            if info.compress_type not in ZIP_METHODS:
                raise Refused(f"uses compression method {info.compress_type}, which is not supported "
                              f"(use {', '.join(ZIP_METHODS.values())})", entry=name)
            if mode and stat.S_ISLNK(mode):
                raise Refused("is a link; only regular files are allowed", entry=name)
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise Refused("is a device or fifo; only regular files are allowed", entry=name)
            fp.seek(info.header_offset)
            local = fp.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise Refused("its local header is missing (corrupt or truncated zip)", entry=name)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset
            end = start + 30 + name_len + extra_len + info.compress_size + (12 if info.flag_bits & 0x8 else 0)
            spans.append((start, end, name))
            is_dir = shown.endswith(("/", "\\")) or (mode and stat.S_ISDIR(mode))
            if is_dir:
                if info.file_size:
                    raise Refused("a zip folder entry has data", entry=name)
                checker.add(name, 0, "dir")
            else:
                checker.add(name, info.file_size, "file")
                files.append((name, info))
    spans.sort()
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if start < end:
            raise Refused(f"overlaps entry {following!r}: two entries share bytes (a zip bomb?)", entry=name)
    if spans and spans[-1][1] > zf.start_dir:
        raise Refused("overlaps the zip's central directory (corrupt or a zip bomb)", entry=spans[-1][2])
    checker.finish()
    return zf, files, checker


def zip_copy(zf, info, name: str, out, limit: int | None = None) -> bytes | None:
    """Reads one member through, verifying its CRC; writes it to `out` or returns up to `limit`
    bytes of it (the rest is still read, so the CRC is checked)."""
    import zipfile

    kept, written = [], 0
    try:
        with zf.open(info) as member:
            while True:
                data = member.read(COPY_CHUNK)
                if not data:
                    break
                written += len(data)
                if written > info.file_size:
                    raise Refused("holds more data than its header says", entry=name)
                if out is not None:
                    out.write(data)
                elif limit is not None and sum(map(len, kept)) < limit:
                    kept.append(data)
    except Refused:
        raise
    except zipfile.BadZipFile as err:
        raise Refused(f"is corrupt: {err}", entry=name) from None
    except (EOFError, zlib.error, lzma.LZMAError, OSError, ValueError, struct.error, NotImplementedError, RuntimeError) as err:
        raise Refused(f"cannot be read (corrupt or truncated: {err or type(err).__name__})", entry=name) from None
    if written != info.file_size:
        raise Refused("is truncated (fewer bytes than its header says)", entry=name)
    return b"".join(kept)[:limit] if limit is not None else None


# ---- writing -------------------------------------------------------------------------------

class Writer:
    """Creates regular files under one folder, never through or as a link, never over an
    existing file; folders are made one level at a time, each opened without following links."""

    def __init__(self, dest: str):
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.written: list[str] = []

    def open(self, name: str):
        *folders, leaf = name.split("/")
        fd = os.dup(self.root)
        try:
            for folder in folders:
                try:
                    os.mkdir(folder, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            try:
                out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
            except FileExistsError:
                raise Refused("would replace a file that is already there", entry=name) from None
        except OSError as err:
            raise Refused(f"cannot be written ({err.strerror})", entry=name) from None
        finally:
            os.close(fd)
        self.written.append(name)
        return os.fdopen(out, "wb")


# ---- requests ------------------------------------------------------------------------------

def _listing(checker: Checker) -> list:
    return [[name, size, kind] for name, size, kind in checker.entries]


def handle(request: dict) -> dict:
    path, limits, op = request["archive"], request["limits"], request["op"]
    with open(path, "rb") as fp:
        archive_bytes = os.fstat(fp.fileno()).st_size
        found = sniff(fp.read(BLOCK))
    if found is None:
        raise Refused("is not a zip or tar archive")
    kind, compression = found
    wanted = set(request["names"]) if request.get("names") is not None else None
    heads = [(suffix, int(n)) for suffix, n in request.get("heads", [])]
    answer = {"ok": True, "kind": kind, "compression": compression}

    if kind == "zip":
        zf, files, checker = zip_check(path, limits, archive_bytes)
        answer["entries"] = _listing(checker)
        if op == "extract":
            writer = Writer(request["dest"])
            for name, info in files:
                if wanted is None or name in wanted:
                    with writer.open(name) as out:
                        zip_copy(zf, info, name, out)
            answer["extracted"] = writer.written
        elif op == "scan":
            answer["heads"] = {}
            for name, info in files:
                limit = next((n for suffix, n in heads if name.endswith(suffix)), None)
                data = zip_copy(zf, info, name, None, limit)
                if limit is not None:
                    answer["heads"][name] = base64.b64encode(data).decode()
        zf.close()
        return answer

    # tar: one pass checks every entry; extraction is a second pass, after all were accepted.
    kept: dict[str, _Head] = {}

    def on_scan(name, size):
        limit = next((n for suffix, n in heads if name.endswith(suffix)), None)
        if limit is None:
            return None
        kept[name] = _Head(limit)
        return kept[name]

    checker = tar_walk(path, compression, limits, archive_bytes, on_scan if op == "scan" else None)
    answer["entries"] = _listing(checker)
    if op == "scan":
        answer["heads"] = {name: base64.b64encode(head.data()).decode() for name, head in kept.items()}
    elif op == "extract":
        writer = Writer(request["dest"])
        tar_walk(path, compression, limits, archive_bytes,
                 lambda name, size: writer.open(name) if wanted is None or name in wanted else None)
        answer["extracted"] = writer.written
    return answer


class _Head:
    """Keeps the first `limit` bytes written to it (a member read through, only its head kept)."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.size = limit, [], 0

    def write(self, data: bytes) -> None:
        if self.size < self.limit:
            part = data[: self.limit - self.size]
            self.parts.append(part)
            self.size += len(part)

    def data(self) -> bytes:
        return b"".join(self.parts)

    def close(self) -> None:
        pass


def _limit_self(limits: dict) -> None:
    import resource

    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    fsize = limits["max_total_bytes"] + MAX_NAMES_BYTES * 4
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.nice(10)  # an upload's parse yields the CPU to the API's own requests (healthz, dispatch)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails instead of killing


def main() -> int:
    request = json.loads(sys.stdin.read())
    _limit_self(request["limits"])
    try:
        answer = handle(request)
    except Refused as err:
        answer = {"ok": False, "error": err.message, "entry": err.entry, "too_large": err.too_large}
    except MemoryError:
        answer = {"ok": False, "error": "needs more memory to read than is allowed", "entry": None, "too_large": True}
    except RecursionError:
        answer = {"ok": False, "error": "is nested too deeply to read", "entry": None, "too_large": False}
    except OSError as err:  # the archive could not be opened or read at all
        answer = {"ok": False, "error": f"could not be read ({err.strerror or err})", "entry": None, "too_large": False}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
