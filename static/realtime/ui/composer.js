// The composer: sending (Enter sends, Shift+Enter is a new line), our pending and
// failed messages in the list, typing notices, focus on load. When the session
// ends (signed out) it is disabled, and every unsent message is marked failed and
// kept in this tab's sessionStorage (per user and room), so that after signing in
// again it is shown with a Retry button instead of being lost.

import { randomId } from "../outbox.js";
import { TYPING_EVERY } from "./presence.js";

const SIGNED_OUT_HINT = "You were signed out. Sign in again, then press Retry: the message is kept in this tab.";

export function bindComposer(client, { room, me, view, presence, form, input }) {
  const stashKey = `realtime.unsent.${me}.${room}`;
  let stopped = false;

  function stash() {
    const unsent = [...view.pending.values()].filter((m) => m.stashed).map((m) => ({ client_id: m.client_id, body: m.body, ts: m.ts }));
    try {
      if (unsent.length) sessionStorage.setItem(stashKey, JSON.stringify(unsent));
      else sessionStorage.removeItem(stashKey);
    } catch (err) {
      /* storage refused: nothing kept */
    }
  }

  function failed(cid, message, signedOut) {
    const m = view.pending.get(cid);
    if (!m) return;
    view.setPending(cid, { ...m, state: "failed", error: message, hint: signedOut ? SIGNED_OUT_HINT : null, stashed: signedOut, retry: () => retry(cid) });
    if (signedOut) stash();
  }

  function post(body, clientId = randomId()) {
    const entry = { client_id: clientId, author: me, body, ts: new Date().toISOString(), state: "pending" };
    view.setPending(clientId, entry);
    if (stopped) return failed(clientId, "signed out", true);
    client.send(room, body, clientId).done.catch((err) => failed(clientId, err.message, err.code === "unauthenticated"));
  }

  function retry(cid) {
    const m = view.pending.get(cid);
    if (!m) return;
    view.setPending(cid, null);
    post(m.body); // a new client_id: the old one was refused or never sent
    stash();
  }

  client.on("sent", ({ clientId, id, seq, room: slug }) => {
    // Acked: shown as stored under its id now; its message.new (which usually
    // follows) finds it in place.
    const m = view.pending.get(clientId);
    if (!m || slug !== room) return;
    view.setPending(clientId, null);
    view.acked({ id, seq, author: me, body: m.body, ts: m.ts, client_id: clientId, edited_at: null });
  });
  client.on("event", (ev) => {
    if (ev.room === room && ev.type === "message.new" && ev.client_id && view.pending.has(ev.client_id)) {
      view.setPending(ev.client_id, null);
    }
  });

  // Unsent messages from before a sign-out in this tab.
  try {
    for (const m of JSON.parse(sessionStorage.getItem(stashKey) || "[]")) {
      view.pending.set(m.client_id, { ...m, author: me, state: "failed", error: "not sent before you were signed out", stashed: true, retry: () => retry(m.client_id) });
    }
  } catch (err) {
    /* nothing kept */
  }

  // A reader's page has no composer: nothing to stop or to resume.
  if (!form) return { signedOut() {}, resume() {} };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const body = input.value;
    if (!body.trim() || stopped) return;
    input.value = "";
    post(body);
    input.focus();
  });
  let typingSent = 0;
  input.addEventListener("input", () => {
    // At most one typing notice every 2 s while the person types (the server
    // throttles too); nothing while the box is empty.
    if (!input.value.trim() || Date.now() - typingSent < TYPING_EVERY) return;
    typingSent = Date.now();
    presence.typing();
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  input.focus({ preventScroll: true });

  return {
    /** The session ended: nothing more can be sent from this page. */
    signedOut(notice) {
      stopped = true;
      input.disabled = true;
      form.querySelector("button[type=submit]").disabled = true;
      form.setAttribute("aria-describedby", notice.id);
      form.before(notice);
    },
    /** Sending works again (a reconnect after an operator's disconnect). */
    resume() {
      stopped = false;
      input.disabled = false;
      form.querySelector("button[type=submit]").disabled = false;
    },
  };
}
