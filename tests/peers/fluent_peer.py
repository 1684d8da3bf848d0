#!/usr/bin/env python3
"""A Fluentd forward-protocol (v1) input, independent of the Rust code under test.

Listens on 127.0.0.1, prints the port it listens on as the first line of stdout, and appends
every entry it receives as one JSON line to OUT:

    {"tag": "td.web.pageviews", "time": 1764245000, "record": {...}, "mode": "forward",
     "chunk": "<id or null>"}

Messages are decoded with msgpack.Unpacker in the Message, Forward, PackedForward and
CompressedPackedForward modes. When a message's option has a `chunk`, the entries are written
(and flushed) first, then `{"ack": chunk}` is answered. The option's `size`, when present, must
equal the number of entries. A message that breaks the protocol is reported on stderr, added to
OUT as `{"error": "..."}` and its connection closed without an ack.

Faults, to exercise the client's retries:
  --drop-first N   the first N messages are read, not recorded, not acknowledged, and their
                   connection is closed
  --wrong-ack N    the first N messages with a chunk (after the dropped ones) are recorded but
                   answered with a different chunk id
  --silent N       the first N messages (after the above) are read, not recorded and never
                   acknowledged; the connection stays open until the client closes it

--exit-on-stdin-eof makes the peer exit when its stdin closes (its parent died).

Usage: fluent_peer.py OUT [--port PORT] [--drop-first N] [--wrong-ack N] [--silent N]
                       [--exit-on-stdin-eof]

Needs the msgpack package: python3 -m pip install msgpack
"""

import argparse
import gzip
import json
import os
import socketserver
import sys
import threading

import msgpack


class ProtocolError(Exception):
    pass


class Peer:
    def __init__(self, out, drop_first, wrong_ack, silent):
        self.out = open(out, "a", encoding="utf-8")
        self.lock = threading.Lock()
        self.messages = 0
        self.drop_first = drop_first
        self.wrong_ack = wrong_ack
        self.silent = silent

    def fault(self, has_chunk):
        """The fault for the next message: None, 'drop', 'wrong' or 'silent'."""
        with self.lock:
            self.messages += 1
            if self.drop_first > 0:
                self.drop_first -= 1
                return "drop"
            if has_chunk and self.wrong_ack > 0:
                self.wrong_ack -= 1
                return "wrong"
            if self.silent > 0:
                self.silent -= 1
                return "silent"
            return None

    def write(self, lines):
        with self.lock:
            for line in lines:
                self.out.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
            self.out.flush()


def event_time(code, data):
    """EventTime (ext type 0): seconds and nanoseconds, both big-endian uint32."""
    if code == 0 and len(data) == 8:
        return ("EventTime", int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big"))
    return msgpack.ExtType(code, data)


def check_time(t):
    if isinstance(t, tuple) and t and t[0] == "EventTime":
        return t[1]
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ProtocolError(f"time is not an integer, float or EventTime: {t!r}")
    return t


def check_record(r):
    if not isinstance(r, dict):
        raise ProtocolError(f"record is not a map: {r!r}")
    for k in r:
        if not isinstance(k, str):
            raise ProtocolError(f"record key is not a string: {k!r}")
    return r


def unpacker():
    return msgpack.Unpacker(raw=False, ext_hook=event_time, strict_map_key=False)


def entries_of(message):
    """(mode, tag, [(time, record)], option) of one decoded message."""
    if not isinstance(message, (list, tuple)) or len(message) < 2:
        raise ProtocolError(f"not an array of 2 or more: {message!r}")
    tag = message[0]
    if not isinstance(tag, str) or not tag:
        raise ProtocolError(f"tag is not a non-empty string: {tag!r}")
    second = message[1]
    if isinstance(second, (list, tuple)):
        mode, option = "forward", message[2] if len(message) > 2 else None
        entries = []
        for e in second:
            if not isinstance(e, (list, tuple)) or len(e) != 2:
                raise ProtocolError(f"entry is not [time, record]: {e!r}")
            entries.append((check_time(e[0]), check_record(e[1])))
    elif isinstance(second, (bytes, str)):
        option = message[2] if len(message) > 2 else None
        data = second if isinstance(second, bytes) else second.encode("utf-8", "surrogateescape")
        mode = "packed"
        if isinstance(option, dict) and option.get("compressed") == "gzip":
            data, mode = gzip.decompress(data), "compressed"
        u = unpacker()
        u.feed(data)
        entries = []
        for e in u:
            if not isinstance(e, (list, tuple)) or len(e) != 2:
                raise ProtocolError(f"packed entry is not [time, record]: {e!r}")
            entries.append((check_time(e[0]), check_record(e[1])))
    else:
        if len(message) < 3:
            raise ProtocolError(f"message mode needs [tag, time, record]: {message!r}")
        mode, option = "message", message[3] if len(message) > 3 else None
        entries = [(check_time(second), check_record(message[2]))]
    if option is not None and not isinstance(option, dict):
        raise ProtocolError(f"option is not a map: {option!r}")
    option = option or {}
    if "size" in option and option["size"] != len(entries):
        raise ProtocolError(f"option size {option['size']!r} but {len(entries)} entries")
    chunk = option.get("chunk")
    if chunk is not None and not isinstance(chunk, str):
        raise ProtocolError(f"chunk is not a string: {chunk!r}")
    return mode, tag, entries, chunk


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        peer = self.server.peer
        u = unpacker()
        sock = self.request
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            u.feed(data)
            try:
                for message in u:
                    if not self.on_message(peer, sock, message):
                        return
            except ProtocolError as e:
                self.error(peer, str(e))
                return
            except Exception as e:  # undecodable bytes
                self.error(peer, f"cannot decode: {e!r}")
                return

    def error(self, peer, text):
        print(f"fluent_peer: protocol error: {text}", file=sys.stderr, flush=True)
        peer.write([{"error": text}])

    def on_message(self, peer, sock, message):
        """Handles one message; False closes the connection."""
        mode, tag, entries, chunk = entries_of(message)
        fault = peer.fault(chunk is not None)
        if fault == "drop":
            print(f"fluent_peer: dropping a message of {len(entries)} entries", file=sys.stderr, flush=True)
            return False
        if fault == "silent":
            print(f"fluent_peer: ignoring a message of {len(entries)} entries", file=sys.stderr, flush=True)
            return True
        peer.write(
            [{"tag": tag, "time": t, "record": r, "mode": mode, "chunk": chunk} for t, r in entries]
        )
        if chunk is not None:
            ack = chunk if fault != "wrong" else "wrong-" + chunk
            sock.sendall(msgpack.packb({"ack": ack}, use_bin_type=True))
        return True


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--drop-first", type=int, default=0)
    p.add_argument("--wrong-ack", type=int, default=0)
    p.add_argument("--silent", type=int, default=0)
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    a = p.parse_args()
    if a.exit_on_stdin_eof:
        def watch():
            sys.stdin.buffer.read()
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    server = Server(("127.0.0.1", a.port), Handler)
    server.peer = Peer(a.out, a.drop_first, a.wrong_ack, a.silent)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
