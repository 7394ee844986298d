"""What a file's first bytes say: its format, and for a JPEG its size, components and EXIF orientation.

Read without Pillow and without pixels, so the scan can route each file (Pillow, or a GPU decoder that
takes it whole) and refuse decompression bombs before anything is decoded.
"""

from __future__ import annotations

import struct

_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(head: bytes) -> str | None:
    """Return the image format the first bytes of a file announce, or None."""
    for signature, fmt in _SIGNATURES:
        if head.startswith(signature):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def not_an_image(head: bytes) -> str | None:
    """Why a file whose first bytes are ``head`` is not read as an image (no format's signature), or None."""
    if sniff_format(head) is None:
        return f"not an image (first bytes {head[:8]!r}; JPEG, PNG, BMP, GIF, WebP and TIFF are read)"
    return None


_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman JPEGs (what nvJPEG decodes)


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, components, exif_orientation)`` of a Huffman JPEG, or ``None``.

    A marker walk in a few microseconds (no pixels, no Pillow): ``None`` for anything that is not
    a baseline or progressive JPEG with 1 or 3 components, which then goes to Pillow.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, orientation, size = 2, 1, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        length = struct.unpack_from(">H", data, pos + 2)[0]
        body = pos + 4
        if marker == 0xE1 and data[body:body + 6] == b"Exif\x00\x00":
            orientation = _exif_orientation(data, body + 6, pos + 2 + length)
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF or body + 6 > size:
                return None
            height, width = struct.unpack_from(">HH", data, body + 1)
            components = data[body + 5]
            if components not in (1, 3) or not width or not height:
                return None
            return width, height, components, orientation
        pos += 2 + length
    return None


def gpu_jpeg(data: bytes, header: tuple | None = ()) -> tuple[int, int, int] | None:
    """``(width, height, EXIF orientation)`` of a JPEG the GPU decoders take whole, else ``None`` (Pillow's).

    A Huffman JPEG of 1 or 3 components (:func:`jpeg_header`) that ends with its end-of-image marker,
    zero padding after it allowed. A cut-off file does not, and goes to Pillow, which names it ("image
    file is truncated") as the CPU path does, where a GPU decoder might fill the missing rows silently
    (and DALI logs an error); a file with other bytes after its image goes to Pillow too, which decodes it.
    ``header``: :func:`jpeg_header` of ``data`` where the caller has it.
    """
    header = jpeg_header(data) if header == () else header
    if header is None or not data[-64:].rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    return header[0], header[1], header[3]


def _exif_orientation(data: bytes, tiff: int, end: int) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[data[tiff:tiff + 2]]
        ifd = tiff + struct.unpack_from(order + "I", data, tiff + 4)[0]
        for i in range(struct.unpack_from(order + "H", data, ifd)[0]):
            entry = ifd + 2 + 12 * i
            if entry + 12 > end:
                break
            if struct.unpack_from(order + "H", data, entry)[0] == 0x0112:
                value = struct.unpack_from(order + "H", data, entry + 8)[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def bomb_reason(width: int, height: int, limit: int) -> str:
    """The one reason given for an image over the pixel limit, wherever it is found."""
    return (f"decompression bomb: {width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
            "(--max-pixels)")
