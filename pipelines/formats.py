"""The image formats the pipelines decode, by their leading bytes (no TensorFlow here).

`tf.io.decode_image` reads all of them; JPEG and PNG also carry an end marker that tells a
truncated file from a whole one.
"""

# name -> (offset, bytes) pairs that must all match. WebP is a RIFF container of type WEBP.
SIGNATURES = {
    "JPEG": ((0, b"\xff\xd8\xff"),),
    "PNG": ((0, b"\x89PNG\r\n\x1a\n"),),
    "GIF": ((0, b"GIF8"),),
    "BMP": ((0, b"BM"),),
    "WebP": ((0, b"RIFF"), (8, b"WEBP")),
}
HEADER_BYTES = 21  # enough to tell every format above, and an animated WebP (is_animated_webp)
# Bytes that a whole file of the format contains at or near its end.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
NAMES = ", ".join(list(SIGNATURES)[:-1]) + " or " + list(SIGNATURES)[-1]
# What a client is told of bad bytes ("{}": their length), by serving and by predict.
NOT_AN_IMAGE = f"not a {NAMES} image ({{}} bytes)"
TRUNCATED = "a truncated image ({} bytes, no end marker); send the whole file"
# The per-file checks made when a folder dataset is indexed (pipelines.sources.load_source).
SCREENS = ("header", "decode", "none")


def image_format(header: bytes) -> str | None:
    """The format whose signature `header` (the first HEADER_BYTES of a file) carries, or None."""
    for name, parts in SIGNATURES.items():
        if all(header[offset:offset + len(part)] == part for offset, part in parts):
            return name
    return None


def is_animated_webp(header: bytes) -> bool:
    """Whether `header` (a file's first HEADER_BYTES) starts an animated WebP: an extended header
    (VP8X chunk) with the animation flag. TensorFlow decodes only still WebP images."""
    return (image_format(header) == "WebP" and header[12:16] == b"VP8X" and len(header) > 20
            and bool(header[20] & 2))


def error_line(message: str) -> str:
    """The informative line of a TensorFlow error message, without the graph and op boilerplate
    ("{{node ...}}", "[Op:DecodeJpeg] name: ", "Graph execution error:", ...); "" if none."""
    import re

    for line in message.splitlines():
        line = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\].*$", "", line).strip()
        if line and not line.startswith(("Graph execution error", "Detected at node",
                                         "<stack traces", "[[")):
            return line.removeprefix("assertion failed: [").removesuffix("]").rstrip(".").strip()
    return ""
