"""Write torch zip checkpoints (what ``torch.save`` writes) without importing torch.

Two pieces: :func:`state_dict_pickle` hand-emits the protocol-2 ``data.pkl`` of an ``OrderedDict`` of tensors,
using only the globals ``torch.load(weights_only=True)`` admits; :class:`ZipWriter` lays out records the way
torch's writer does (stored, 64-byte aligned data through a padding extra field, CRC-32s, zip64 end records).
Record data is written by the caller straight into the file descriptor at the offsets given out here.
"""

from __future__ import annotations

import builtins
import struct
import zlib
from dataclasses import dataclass

from ..dtypes import DTYPE_BITS, STORAGE_CLASSES, TORCH_NAMES
from ..fileio import write_all

#: torch aligns every record's data to this many bytes (``storage_alignment``), which makes mmap loading possible.
ALIGNMENT = 64

_STORAGE_CLASS = {dtype: cls for cls, dtype in STORAGE_CLASSES.items()}


@dataclass(frozen=True, slots=True)
class PickledTensor:
    """A contiguous tensor over the whole of storage ``key`` (``nbytes`` bytes)."""

    dtype: str
    shape: tuple[int, ...]
    key: str
    nbytes: int


class _Pickler:
    """The handful of protocol-2 opcodes a state dict needs, memoizing each global once like pickle does."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo: dict[object, int] = {}

    def put(self, key: object) -> None:
        index = len(self.memo)
        self.memo[key] = index
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def get(self, key: object) -> bool:
        index = self.memo.get(key)
        if index is None:
            return False
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    def glob(self, module: str, name: str) -> None:
        if not self.get(("global", module, name)):
            self.out += b"c" + f"{module}\n{name}\n".encode("ascii")
            self.put(("global", module, name))

    def string(self, text: str) -> None:
        if not self.get(("str", text)):
            raw = text.encode("utf-8")
            self.out += b"X" + struct.pack("<I", len(raw)) + raw
            self.put(("str", text))

    def int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1

    def int_tuple(self, values: tuple[builtins.int, ...]) -> None:
        if not values:
            self.out += b")"
            return
        if len(values) > 3:
            self.out += b"("
        for value in values:
            self.int(value)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t")


def state_dict_pickle(names: list[tuple[str, PickledTensor]]) -> bytes:
    """``data.pkl`` for ``OrderedDict(names)``; names sharing a :class:`PickledTensor` unpickle to one tensor.

    Dtypes with a legacy storage class (``torch.FloatStorage``…) use ``_rebuild_tensor_v2``; the others
    (uint16, float8…) use ``_rebuild_tensor_v3`` over an ``UntypedStorage``, as torch itself does.
    """
    p = _Pickler()
    p.glob("collections", "OrderedDict")
    p.out += b")R"  # OrderedDict()
    p.put(("dict",))
    if names:
        p.out += b"("  # MARK
    for name, tensor in names:
        p.string(name)
        if p.get(("tensor", tensor.key)):
            continue  # same tensor object: torch.load restores the sharing
        legacy = _STORAGE_CLASS.get(tensor.dtype)
        p.glob("torch._utils", "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3")
        p.out += b"(("  # args tuple, then the persistent id tuple
        p.string("storage")
        if legacy:
            p.glob("torch", legacy)
            numel = tensor.nbytes * 8 // DTYPE_BITS[tensor.dtype]
        else:
            p.glob("torch.storage", "UntypedStorage")
            numel = tensor.nbytes
        p.string(tensor.key)
        p.string("cpu")
        p.int(numel)
        p.out += b"tQ"  # TUPLE, BINPERSID
        p.int(0)  # storage_offset
        p.int_tuple(tensor.shape)
        p.int_tuple(_contiguous_stride(tensor.shape))
        p.out += b"\x89"  # requires_grad=False
        p.glob("collections", "OrderedDict")
        p.out += b")R"  # backward_hooks=OrderedDict()
        if not legacy:
            p.glob("torch", TORCH_NAMES[tensor.dtype])
        p.out += b"tR"  # TUPLE, REDUCE
        p.put(("tensor", tensor.key))
    if names:
        p.out += b"u"  # SETITEMS
    p.out += b"."
    return bytes(p.out)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for dim in reversed(shape):
        stride.append(step)
        step *= max(dim, 1)
    return tuple(reversed(stride))


# --- the zip container ----------------------------------------------------------------------------------------

_ZIP64_LIMIT = 0xFFFFFFFF
_PAD_ID = 0x4246  # "FB", the extra field id torch pads with


@dataclass(slots=True)
class _Entry:
    name: bytes
    header_offset: int
    size: int
    crc: int = 0


class ZipWriter:
    """Lay out a stored (uncompressed) zip in ``fd`` record by record; data regions are filled by the caller.

    Call :meth:`begin` to place a record's local header and learn where its ``size`` data bytes go, write them
    there, then :meth:`end` with their CRC-32 (patched into the header). :meth:`close` writes the central
    directory. Records get zip64 fields only where a size or offset needs them.
    """

    def __init__(self, fd: int, prefix: str) -> None:
        self.fd = fd
        self.prefix = prefix
        self.position = 0
        self.entries: list[_Entry] = []

    def begin(self, name: str, size: int) -> int:
        entry = _Entry(f"{self.prefix}/{name}".encode(), self.position, size)
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        start = self.position + 30 + len(entry.name) + len(extra) + 4
        pad = -start % ALIGNMENT
        extra += struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        entry_size = _ZIP64_LIMIT if zip64 else size
        header = struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45 if zip64 else 20,
            0x800,
            0,
            0,
            0x21,
            0,
            entry_size,
            entry_size,
            len(entry.name),
            len(extra),
        )
        data_offset = self.position + len(header) + len(entry.name) + len(extra)
        write_all(self.fd, header + entry.name + extra, self.position)
        self.entries.append(entry)
        self.position = data_offset + size
        return data_offset

    def end(self, crc: int) -> None:
        entry = self.entries[-1]
        entry.crc = crc
        write_all(self.fd, struct.pack("<I", crc), entry.header_offset + 14)

    def add(self, name: str, data: bytes) -> None:
        write_all(self.fd, data, self.begin(name, len(data)))
        self.end(zlib.crc32(data))

    def close(self) -> int:
        """Write the central directory and end records; return the file's size."""
        directory = bytearray()
        for entry in self.entries:
            fields, size, offset = [], entry.size, entry.header_offset
            if size >= _ZIP64_LIMIT:
                fields += [size, size]
                size = _ZIP64_LIMIT
            if offset >= _ZIP64_LIMIT:
                fields.append(offset)
                offset = _ZIP64_LIMIT
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            directory += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                45 if fields else 20,
                45 if fields else 20,
                0x800,
                0,
                0,
                0x21,
                entry.crc,
                size,
                size,
                len(entry.name),
                len(extra),
                0,
                0,
                0,
                0,
                offset,
            )
            directory += entry.name + extra
        start, count = self.position, len(self.entries)
        end64 = start + len(directory)
        records = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), start)
        records += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
        records += struct.pack(
            "<IHHHHIIH",
            0x06054B50,
            0,
            0,
            min(count, 0xFFFF),
            min(count, 0xFFFF),
            min(len(directory), _ZIP64_LIMIT),
            min(start, _ZIP64_LIMIT),
            0,
        )
        write_all(self.fd, bytes(directory) + records, start)
        self.position = end64 + len(records)
        return self.position
