"""The fixed vocabulary of reject reasons written to `rejects.parquet` by `capfilt ingest`.

Every row that a source offers but the manifest does not keep is recorded once, with one of these
reasons and a human-readable detail. The vocabulary is closed: the rejects schema checks against
`REJECT_REASONS`, and summaries count by it, so a new failure kind means a new constant here.
"""

from __future__ import annotations

# the image file or member
MISSING_FILE = "missing_file"  # the path names no file / object
EMPTY_FILE = "empty_file"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # Pillow recognises no image format (text, html, a folder...)
TRUNCATED_IMAGE = "truncated_image"  # a known format that ends early
UNREADABLE_IMAGE = "unreadable_image"  # corrupt data, unsupported mode, read error
DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than ingest.max_pixels; never decoded
PATH_ESCAPES_ROOT = "path_escapes_root"  # "../x" or an absolute path outside the image root
NO_IMAGE_FOR_ANNOTATION = "no_image_for_annotation"  # an annotation/row/tar key without an image
# the caption
EMPTY_CAPTION = "empty_caption"  # null, empty, whitespace or markup only
NON_STRING_CAPTION = "non_string_caption"  # a number, list, mapping...
INVALID_UTF8 = "invalid_utf8"  # undecodable bytes in a shard's .txt, lone surrogates in JSON
# the pair
DUPLICATE = "duplicate"  # same image bytes (sha256) and same normalised caption as a kept row

REJECT_REASONS: tuple[str, ...] = (
    MISSING_FILE,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    UNREADABLE_IMAGE,
    DECOMPRESSION_BOMB,
    PATH_ESCAPES_ROOT,
    NO_IMAGE_FOR_ANNOTATION,
    EMPTY_CAPTION,
    NON_STRING_CAPTION,
    INVALID_UTF8,
    DUPLICATE,
)
