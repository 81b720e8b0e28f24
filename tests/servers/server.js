// Node's http server on the socket `switcheroo run` passes as fd 3, with the shutdown
// that keeps keep-alive clients from racing a closing connection.
//
// server.close() alone (Node 19+) closes every idle keep-alive connection at once, and a
// client that sends its next request at that moment gets a reset or an EOF. Instead, on
// SIGTERM (which `switcheroo run` sends after its drain, when no new connection can
// arrive any more): answer every request from then on with `Connection: close`, so each
// client leaves after its next response, close a connection only once it has been idle
// for a second, and exit when none is left.
"use strict";
const http = require("http");

let draining = false;
const idleSince = new Map(); // socket -> time of its last response, while idle

const server = http.createServer((req, res) => {
  idleSince.delete(req.socket);
  if (draining) res.setHeader("Connection", "close");
  res.on("finish", () => idleSince.set(req.socket, Date.now()));
  res.end(`hello from pid ${process.pid} port ${process.env.SWITCHEROO_PORT}`);
});
server.keepAliveTimeout = 5000;
server.on("connection", (socket) => {
  idleSince.set(socket, Date.now());
  socket.on("close", () => idleSince.delete(socket));
});
server.listen({ fd: 3 });

process.on("SIGTERM", () => {
  draining = true;
  setInterval(() => {
    const now = Date.now();
    for (const [socket, since] of idleSince) {
      if (now - since >= 1000) socket.destroy();
    }
    server.getConnections((err, n) => { if (!err && n === 0) process.exit(0); });
  }, 100);
});
