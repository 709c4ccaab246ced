"""Static files over plain HTTP, sans I/O: a request in, a complete response out.

Only GET and HEAD, only regular files below the root (no path traversal: the
resolved path must stay inside it), ``index.html`` for a directory.
"""

from __future__ import annotations

import mimetypes
import os
from urllib.parse import unquote

from .errors import HandshakeError
from .handshake import Request, build_error_response, build_response

MAX_FILE_SIZE = 16 << 20
#: The Content-Security-Policy of served files: what the bundled browser client needs, nothing more.
DEFAULT_PAGE_POLICY = ("default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; "
                       "script-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def file_response(root: str | None, request: Request, policy: str | None = DEFAULT_PAGE_POLICY) -> bytes:
    """The HTTP response for ``request`` served from the directory ``root``,
    with ``policy`` as its Content-Security-Policy (None: none)."""
    return found_file_response(resolve(root, request.path), request, policy)


def found_file_response(path: str | None, request: Request, policy: str | None = DEFAULT_PAGE_POLICY) -> bytes:
    """``file_response`` for the file ``resolve`` found for ``request`` (None: none)."""
    head_only = request.method == "HEAD"

    def error(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        return build_error_response(HandshakeError(status, reason, headers), head_only=head_only)

    if request.method not in ("GET", "HEAD"):
        return error(405, f"method {request.method} not allowed", (("Allow", "GET, HEAD"),))
    if path is None:
        return error(404, "not found")
    try:
        with open(path, "rb") as file:
            body = file.read(MAX_FILE_SIZE + 1)
    except OSError:
        return error(404, "not found")
    if len(body) > MAX_FILE_SIZE:
        return error(500, "file too large to serve")
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type == "application/javascript":
        content_type += "; charset=utf-8"
    headers = [
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Connection", "close"),
    ]
    if policy:
        headers.append(("Content-Security-Policy", policy))
    return build_response(200, headers, body, with_length=True, head_only=head_only)


def resolve(root: str | None, url_path: str) -> str | None:
    """The regular file below ``root`` that ``url_path`` names, or None.

    Containment is checked on the final path, ``index.html`` included, with
    every symbolic link resolved: a link out of the root is never followed.
    """
    if root is None:
        return None
    root = os.path.realpath(root)
    relative = unquote(url_path).lstrip("/")
    if "\0" in relative:
        return None
    path = os.path.join(root, relative)
    if os.path.isdir(path):
        path = os.path.join(path, "index.html")
    path = os.path.realpath(path)
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        return None
    return path
