"""Sans-IO HTTP/2 abuse guard: a frame-header scanner in front of the h2 state machine.

Theory of operation
-------------------
`FrameGuard.feed(data, now)` walks the 9-byte frame headers of what a peer sent (payloads
are skipped, never copied), before the bytes reach `h2`, and returns the reason to end the
connection (GOAWAY ENHANCE_YOUR_CALM) or "". It catches what the HTTP/2 state machine
accepts as valid but costs the server CPU or memory out of proportion:

* CONTINUATION floods (CVE-2024-27316 and kin): more than `max_continuations` CONTINUATION
  frames, or more than `max_header_block` bytes, in one header block;
* oversized header blocks: HEADERS + CONTINUATION payload above `max_header_block`
  (the decoded size is bounded again by h2's SETTINGS_MAX_HEADER_LIST_SIZE check);
* rapid reset (CVE-2023-44487): RST_STREAM frames from the peer beyond a token bucket
  (`reset_burst`, refilled at `reset_rate` a second), since each reset stream costs a
  request's work while never counting against SETTINGS_MAX_CONCURRENT_STREAMS;
* SETTINGS and PING floods: each beyond its own token bucket (every one costs an ACK).

The scanner keeps a fixed amount of state (a partial frame header at most), so its memory
is bounded whatever the peer sends; its CPU is one header decode per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, CONTINUATION = 0x1, 0x3, 0x4, 0x6, 0x9
END_HEADERS, ACK = 0x4, 0x1
FLOODS = {
    RST_STREAM: "rapid reset (RST_STREAM over budget)",
    SETTINGS: "SETTINGS flood",
    PING: "PING flood",
}


@dataclass(frozen=True, slots=True)
class H2Limits:
    max_continuations: int = 32
    max_header_block: int = 64 * 1024
    reset_burst: int = 100
    reset_rate: float = 10.0
    settings_burst: int = 20
    settings_rate: float = 5.0
    ping_burst: int = 50
    ping_rate: float = 10.0


class _Bucket:
    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate, self.level, self.stamp = burst, rate, float(burst), 0.0

    def take(self, now: float) -> bool:
        if self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


class FrameGuard:
    """Scan frame headers; `feed` returns "" or why the connection must end."""

    def __init__(self, limits: H2Limits = H2Limits(), *, skip: int = 0) -> None:
        self.limits = limits
        self._skip = skip  # bytes before the first frame (the client preface, server side)
        self._head = b""
        self._in_block = False
        self._block_bytes = 0
        self._continuations = 0
        self._resets = _Bucket(limits.reset_burst, limits.reset_rate)
        self._settings = _Bucket(limits.settings_burst, limits.settings_rate)
        self._pings = _Bucket(limits.ping_burst, limits.ping_rate)
        self._buckets = {RST_STREAM: self._resets, SETTINGS: self._settings, PING: self._pings}

    def feed(self, data: bytes, now: float) -> str:
        i, n = 0, len(data)
        if self._skip:
            i = min(self._skip, n)
            self._skip -= i
        while i < n:
            need = 9 - len(self._head)
            self._head += data[i : i + need]
            i += need
            if len(self._head) < 9:
                return ""
            h, self._head = self._head, b""
            length = int.from_bytes(h[0:3], "big")
            problem = self._frame(h[3], h[4], length, now)
            if problem:
                return problem
            self._skip = length
            take = min(length, n - i)
            i += take
            self._skip -= take
        return ""

    def _frame(self, kind: int, flags: int, length: int, now: float) -> str:
        if kind == HEADERS or (kind == CONTINUATION and self._in_block):
            return self._header_block(kind, flags, length)
        bucket = self._buckets.get(kind)
        if bucket is None or (kind != RST_STREAM and flags & ACK) or bucket.take(now):
            return ""
        return FLOODS[kind]

    def _header_block(self, kind: int, flags: int, length: int) -> str:
        lim = self.limits
        if kind == HEADERS:
            self._block_bytes, self._continuations = 0, 0
        else:
            self._continuations += 1
            if self._continuations > lim.max_continuations:
                return f"CONTINUATION flood (over {lim.max_continuations} in one block)"
        self._block_bytes += length
        if self._block_bytes > lim.max_header_block:
            return f"header block over {lim.max_header_block} bytes"
        self._in_block = not flags & END_HEADERS
        return ""
