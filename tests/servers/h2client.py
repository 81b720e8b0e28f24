"""An HTTP/2 client that keeps one multiplexed TLS connection busy and reconnects.

Usage: h2client.py HOST PORT SECONDS

It keeps 4 requests (streams) in flight on one connection at a time. When the server
sends GOAWAY, the streams it names as unprocessed (above last_stream_id) are sent again
on a new connection, as HTTP/2 allows, and the others are awaited on the old one; when
the connection ends without GOAWAY (a cut), the streams in flight fail. It prints one
line of counts as JSON:
{"ok": N, "failed": N, "retried": N, "goaways": N, "cuts": N, "connections": N}

The h2 library stops accepting frames once it has seen GOAWAY, so frames are split here
and only those before GOAWAY go to it; after it, END_STREAM and RST_STREAM are read from
the frame headers directly.
"""

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
IN_FLIGHT = 4
DATA, HEADERS, RST_STREAM = 0, 1, 3
END_STREAM = 0x1
counts = {"ok": 0, "failed": 0, "retried": 0, "goaways": 0, "cuts": 0, "connections": 0}


class Connection:
    def __init__(self):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection((host, port), timeout=5)
        self.tls = ctx.wrap_socket(raw, server_hostname="localhost")
        if self.tls.selected_alpn_protocol() != "h2":
            raise SystemExit("the server did not negotiate h2")
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True)
        )
        self.h2.initiate_connection()
        self.tls.sendall(self.h2.data_to_send())
        self.buffer = b""
        self.goaway = None
        self.pending = set()
        counts["connections"] += 1

    def request(self):
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream,
            [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", host)],
            end_stream=True,
        )
        self.tls.sendall(self.h2.data_to_send())
        self.pending.add(stream)

    def receive(self):
        """Reads and handles what arrives; False once the connection has ended."""
        try:
            data = self.tls.recv(65536)
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            return False
        self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[0:3], "big")
            if len(self.buffer) < 9 + length:
                break
            frame, self.buffer = self.buffer[: 9 + length], self.buffer[9 + length :]
            kind, flags = frame[3], frame[4]
            stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
            if self.goaway is None:
                for event in self.h2.receive_data(frame):
                    if isinstance(event, h2.events.DataReceived):
                        # Give the window back, or the server stops after 64 KiB.
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    if isinstance(event, h2.events.StreamEnded):
                        self.done(event.stream_id, True)
                    elif isinstance(event, h2.events.StreamReset):
                        self.done(event.stream_id, False)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = event.last_stream_id
                out = self.h2.data_to_send()
                if out:
                    try:
                        self.tls.sendall(out)
                    except OSError:
                        pass
            elif kind in (DATA, HEADERS) and flags & END_STREAM:
                self.done(stream, True)
            elif kind == RST_STREAM:
                self.done(stream, False)
        return True

    def done(self, stream, ok):
        if stream in self.pending:
            self.pending.discard(stream)
            counts["ok" if ok else "failed"] += 1


deadline = time.monotonic() + seconds
conn = Connection()
retry = 0
while True:
    running = time.monotonic() < deadline
    if conn.goaway is None:
        while (running and len(conn.pending) < IN_FLIGHT) or retry:
            conn.request()
            retry = max(0, retry - 1)
    if not conn.pending and not running:
        break
    alive = conn.receive()
    if conn.goaway is not None and not getattr(conn, "counted", False):
        conn.counted = True
        counts["goaways"] += 1
        # Streams above last_stream_id were not processed: send them again elsewhere.
        unprocessed = {s for s in conn.pending if s > conn.goaway}
        counts["retried"] += len(unprocessed)
        retry += len(unprocessed)
        conn.pending -= unprocessed
    if not alive:
        if conn.goaway is None:
            counts["cuts"] += 1
        counts["failed"] += len(conn.pending)
        conn.tls.close()
        if time.monotonic() >= deadline and not retry:
            break
        conn = Connection()
    elif conn.goaway is not None and not conn.pending:
        # Everything this connection processed has arrived: move on.
        conn.tls.close()
        if time.monotonic() >= deadline and not retry:
            break
        conn = Connection()
print(json.dumps(counts))
