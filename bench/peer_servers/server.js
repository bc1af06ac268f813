// Node's socket.io as bench/peers.py measures it: one process, the in-memory
// adapter (its default), the WebSocket transport only, no compression.
// A member joins a room with an acknowledged `join`; `message` (room, text) is
// emitted to everyone in the room, the sender included, as our pipeline echoes
// a sender's own message. Listens on 127.0.0.1:<port>, prints READY when it does.
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2]);
const httpServer = http.createServer();
const io = new Server(httpServer, {
  serveClient: false,
  transports: ["websocket"],
  perMessageDeflate: false,
  maxHttpBufferSize: 65536,
});

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    if (typeof room !== "string") return;
    socket.join(room);
    if (typeof ack === "function") ack(true);
  });
  socket.on("message", (room, text) => {
    if (typeof room === "string") io.to(room).emit("message", text);
  });
});

httpServer.listen(port, "127.0.0.1", () => console.log("READY"));
