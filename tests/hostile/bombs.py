"""Decompression bombs for the amplification tests (issue 10), written in streaming chunks so
that building one never holds its decoded or inflated size in the test process.

- :func:`write_rle_bomb`: an RLE Lossless CR declaring ``rows`` x ``cols`` at 16 bits, every row
  constant (eight grey bands, so it has contrast and would be scored), each row 64 replicate runs
  of 128 bytes (2 bytes each): 8192 x 8192 is a 2 MiB file that decodes to 128 MiB.
- :func:`write_deflate_bomb`: a Deflated Explicit VR Little Endian CR whose data set holds a
  small real image and a private OB element of zeros: ``inflated`` bytes once inflated, about
  a thousandth of that on disk (zlib level 9).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
ROOT = "1.2.826.0.1.3680043.8.498.99."


def radiograph_header(rows: int, cols: int, ts: str, seed: str) -> Dataset:
    """A chest CR header the gate lets through (no patient data but an ID)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(ROOT, [seed, "sop"])
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(ROOT, [seed, "study"])
    ds.SeriesInstanceUID = generate_uid(ROOT, [seed, "series"])
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientID = f"BOMB-{seed}"
    ds.PatientAge = "003Y"
    ds.AccessionNumber = f"B{zlib.crc32(seed.encode()) % 10**8}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    return ds


def band_value(row: int, rows: int) -> int:
    return 300 + 400 * (8 * row // rows)  # eight bands, 300 .. 3100 (12 bits)


def rle_frame(rows: int, cols: int) -> bytes:
    """Two segments (MSB, LSB), every row of each a run of replicate runs of 128 bytes."""
    if cols % 128:
        raise ValueError("cols must be a multiple of 128")
    segments = []
    for shift in (8, 0):
        seg = bytearray()
        for row in range(rows):
            byte = (band_value(row, rows) >> shift) & 0xFF
            seg += bytes((0x81, byte)) * (cols // 128)  # 0x81: repeat the next byte 128 times
        segments.append(bytes(seg))
    header = struct.pack("<16L", 2, 64, 64 + len(segments[0]), *([0] * 13))
    return header + b"".join(segments)


def write_rle_bomb(path: Path, rows: int = 8192, cols: int = 8192, seed: str = "rle") -> Path:
    ds = radiograph_header(rows, cols, RLELossless, seed)
    ds.PixelData = encapsulate([rle_frame(rows, cols)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _element(group: int, elem: int, vr: bytes, value_length: int) -> bytes:
    """An Explicit VR Little Endian element header (OB/OW: 4-byte length)."""
    return struct.pack("<HH", group, elem) + vr + b"\x00\x00" + struct.pack("<L", value_length)


def write_deflate_bomb(path: Path, inflated: int = 512 * 2**20, rows: int = 512,
                       cols: int = 512, seed: str = "deflate") -> Path:
    """``inflated`` bytes of data set (a private OB element of zeros fills it up to that) in
    a file of about ``inflated / 1000`` bytes; the image itself is ``rows`` x ``cols``
    16-bit with eight grey bands."""
    ds = radiograph_header(rows, cols, DeflatedExplicitVRLittleEndian, seed)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    creator = b"CXRTEST "
    pixels = b"".join(band_value(r, rows).to_bytes(2, "little") * cols for r in range(rows))
    fixed = (len(head.getvalue()) + 8 + len(creator) + 12 + 12 + len(pixels))
    filler = max(0, inflated - fixed)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM" + meta.getvalue())
        f.write(z.compress(head.getvalue()))
        # (0029,0010) LO private creator, (0029,1000) OB: the zeros
        f.write(z.compress(struct.pack("<HH", 0x0029, 0x0010) + b"LO"
                           + struct.pack("<H", len(creator)) + creator))
        f.write(z.compress(_element(0x0029, 0x1000, b"OB", filler)))
        chunk = bytes(2**20)
        left = filler
        while left:
            n = min(left, len(chunk))
            f.write(z.compress(chunk[:n]))
            left -= n
        f.write(z.compress(_element(0x7FE0, 0x0010, b"OW", len(pixels)) + pixels))
        f.write(z.flush())
    return path


def write_native(path: Path, rows: int, cols: int, seed: str = "native") -> Path:
    """An honest Explicit VR Little Endian CR of ``rows`` x ``cols`` (eight grey bands)."""
    ds = radiograph_header(rows, cols, ExplicitVRLittleEndian, seed)
    ds.PixelData = b"".join(band_value(r, rows).to_bytes(2, "little") * cols
                            for r in range(rows))
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return path
