// A Node client of rt.v1.protobuf, built on docs/protocol.proto alone (protobufjs),
// for tests/realtime/test_protobuf_clients.py: it opens a socket to a real worker,
// sends each frame of a script (JSON, on stdin: {url, cookie, origin, frames}) and
// waits for its reply (the one with its ref), then prints every frame it received,
// decoded and turned into the JSON form's shape, one JSON object per line.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import protobuf from "protobufjs";
import WebSocket from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
// keepCase: the fields keep the names the JSON form has (client_id, not clientId).
const root = new protobuf.Root().loadSync(path.join(here, "..", "..", "docs", "protocol.proto"), { keepCase: true });
const Frame = root.lookupType("rt.v1.Frame");
const envelope = Frame.oneofs.frame.fieldsArray;  // one field per frame class

const script = JSON.parse(readFileSync(0, "utf8"));
const tagOf = script.tags;  // envelope field name -> the frame's `type`
const fieldOf = script.fields;  // a client frame's `type` -> its envelope field name

/** A decoded message as the JSON form has it: `ref` from whichever member is set,
 * optional fields only when present, nested messages likewise. */
function plain(message, type) {
  const out = {};
  for (const field of type.fieldsArray) {
    const value = message[field.name];
    const oneof = field.partOf;
    if (oneof && !oneof.name.startsWith("_")) {
      if (message[oneof.name] === field.name) out[oneof.name] = toNumber(value);
      continue;
    }
    if (field.map) {
      out[field.name] = Object.fromEntries(Object.entries(value || {}).map(([k, v]) => [k, toNumber(v)]));
      continue;
    }
    if (field.repeated) {
      out[field.name] = (value || []).map((v) => (field.resolvedType ? plain(v, field.resolvedType) : toNumber(v)));
      continue;
    }
    if (oneof && !message.hasOwnProperty(field.name)) continue;  // proto3 optional, absent
    if (field.resolvedType) {
      if (value != null) out[field.name] = plain(value, field.resolvedType);
      continue;
    }
    out[field.name] = toNumber(value);
  }
  return out;
}

function toNumber(value) {
  return value && typeof value === "object" && "low" in value ? Number(value.toString()) : value;
}

function encode(frame) {
  const field = fieldOf[frame.type];
  const body = {};
  for (const [key, value] of Object.entries(frame)) {
    if (key === "type") continue;
    if (key === "ref") body[typeof value === "number" ? "ref_number" : "ref_text"] = value;
    else body[key] = value;
  }
  const message = Frame.fromObject({ [field]: body });
  const problem = Frame.verify(message);
  if (problem) throw new Error(problem);
  return Frame.encode(message).finish();
}

const ws = new WebSocket(script.url, ["rt.v1.protobuf"], { headers: { Cookie: script.cookie }, origin: script.origin });
ws.binaryType = "nodebuffer";
const waiting = new Map();  // ref -> resolve
ws.on("message", (data) => {
  const decoded = Frame.decode(data);
  const which = decoded.frame;
  const field = envelope.find((f) => f.name === which);
  const out = { type: tagOf[which], ...plain(decoded[which], field.resolvedType) };
  process.stdout.write(JSON.stringify(out) + "\n");
  if (out.ref !== undefined && waiting.has(out.ref)) {
    waiting.get(out.ref)();
    waiting.delete(out.ref);
  }
});
ws.on("error", (err) => { console.error(String(err)); process.exit(2); });
ws.on("open", async () => {
  if (ws.protocol !== "rt.v1.protobuf") { console.error(`subprotocol ${ws.protocol}`); process.exit(2); }
  for (const frame of script.frames) {
    const answered = new Promise((resolve) => waiting.set(frame.ref, resolve));
    ws.send(encode(frame));
    await Promise.race([answered, new Promise((_, reject) => setTimeout(() => reject(new Error(`no reply to ${frame.ref}`)), 10000))]);
  }
  ws.close(1000);
});
ws.on("close", () => process.exit(0));
