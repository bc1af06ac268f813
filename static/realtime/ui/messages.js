// The message list of the open room: all of its history, a window at a time. It
// keeps the room's messages (timeline.js) and renders at most WINDOW of them, with
// day separators, a "new messages" divider before the first unread one, and a
// "beginning of the room" marker once the oldest is loaded. Scrolling up shifts
// the window and loads older pages (`before`); nodes far away are dropped and
// drawn again on the way back; the scroll position stays where it was. Pending and
// failed sends of ours show after the stored ones. DOM writes happen once per
// animation frame (the page's scheduler).

import { dayKey, dayLabel } from "./dates.js";
import { drawMessage } from "./message.js";
import { Timeline, lowerBound } from "./timeline.js";

export const WINDOW = 300; // messages rendered at most
const STEP = 100; // messages added (and dropped at the far end) per shift
const LEAP = 250; // the same, when the list is scrolled right to its end (less than WINDOW: the anchor stays)
const PAGE = 200; // messages per history page (REALTIME_HISTORY_PAGE_MAX)
const EDGE = 800; // px from an end of the list at which the window moves

export function createMessageView({ list, room, me, canPost, canModerate, canReact = canPost, api, client, schedule, afterRender, react, pick }) {
  const timeline = new Timeline();
  const pending = new Map(); // client_id -> {client_id, author, body, ts, state, error, hint}
  const nodes = new Map(); // key -> rendered node
  const dirty = new Set(); // message keys to draw again
  const editing = new Map(); // message id -> draft
  const confirming = new Set(); // message ids asking "delete?"
  const problems = new Map(); // message id -> what went wrong (an edit, a delete)
  let win = { from: 0, to: Infinity }; // seqs of the first and last rendered message (Infinity: the live end)
  let divider = null; // seq of the first unread message at opening
  let target = null; // seq of the message a search result opened the room at
  let opened = false;
  let loading = false;
  let stick = "bottom"; // after the next render: "bottom", "divider", or null (keep the anchor)
  let focusAfter = null; // a selector to focus after the next render

  const attached = () => win.to === Infinity;
  const redraw = (key) => {
    if (key) dirty.add(key);
    schedule(render);
  };

  function indices() {
    const items = timeline.items;
    const lo = lowerBound(items, win.from);
    const hi = attached() ? items.length : lowerBound(items, win.to + 1);
    return [lo, hi];
  }

  function setWindow(lo, hi) {
    const items = timeline.items;
    win = { from: items[lo] ? items[lo].seq : 0, to: hi >= items.length ? Infinity : items[hi - 1].seq };
  }

  const fromBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight;
  const nearBottom = () => fromBottom() < 80;

  // -- drawing ---------------------------------------------------------------
  function marker(key, className, text, build) {
    if (nodes.has(key)) return nodes.get(key);
    const li = document.createElement("li");
    li.className = className;
    if (build) build(li);
    else li.textContent = text;
    nodes.set(key, li);
    return li;
  }

  function daySeparator(ts) {
    const date = new Date(ts);
    const key = `day:${dayKey(date)}`;
    return [key, marker(key, "day", null, (li) => {
      li.setAttribute("role", "separator");
      const t = Object.assign(document.createElement("time"), { dateTime: dayKey(date), textContent: dayLabel(date) });
      li.append(t);
    })];
  }

  function messageNode(key, m) {
    if (nodes.has(key) && !dirty.has(key)) return nodes.get(key);
    const id = m.id;
    const li = drawMessage(key, m, {
      me, canPost, canModerate, canReact: canReact && !!react,
      target: target !== null && m.seq === target,
      editing: id ? editing.get(id) : undefined,
      confirming: id ? confirming.has(id) : false,
      problem: id ? problems.get(id) : null,
      on: {
        edit: () => { editing.set(id, m.body); problems.delete(id); focusAfter = `li[data-key="${key}"] textarea`; redraw(key); },
        draft: (text) => editing.set(id, text),
        cancelEdit: () => { editing.delete(id); focusAfter = `li[data-key="${key}"] .actions button`; redraw(key); },
        save: (body) => save(key, m, body),
        remove: () => { confirming.add(id); problems.delete(id); focusAfter = `li[data-key="${key}"] .cancel`; redraw(key); },
        cancelRemove: () => { confirming.delete(id); focusAfter = `li[data-key="${key}"] .actions button`; redraw(key); },
        confirmRemove: () => remove(key, m),
        retry: m.state === "failed" && m.retry ? () => m.retry() : null,
        toggle: (emoji, mine) => react(m, emoji, !mine, (err) => { problems.set(id, `Could not react: ${err.message}`); redraw(key); }),
        pick: (anchor, label) => pick(anchor, label, (emoji) => react(m, emoji, true, (err) => { problems.set(id, `Could not react: ${err.message}`); redraw(key); })),
      },
    });
    const old = nodes.get(key);
    if (old && old.parentNode) old.replaceWith(li);
    nodes.set(key, li);
    return li;
  }

  function desired() {
    const items = timeline.items;
    const [lo, hi] = indices();
    const out = [];
    if (lo > 0 || timeline.hasOlder) {
      out.push(["older", marker("older", "older muted", "Loading older messages…")]);
    } else if (opened) {
      out.push(["beginning", marker("beginning", "beginning muted", `This is the beginning of #${room}.`)]);
    }
    let day = lo > 0 ? dayKey(new Date(items[lo - 1].ts)) : null;
    const dayOf = (m) => {
      const d = dayKey(new Date(m.ts));
      if (d !== day) {
        day = d;
        out.push(daySeparator(m.ts));
      }
    };
    for (let i = lo; i < hi; i++) {
      const m = items[i];
      dayOf(m);
      if (m.seq === divider) out.push(["new", marker("new", "new-divider", null, (li) => {
        li.setAttribute("role", "separator");
        li.append(Object.assign(document.createElement("span"), { textContent: "New messages" }));
      })]);
      out.push([`m${m.id}`, messageNode(`m${m.id}`, { ...m, state: "sent" })]);
    }
    if (attached()) {
      for (const [cid, m] of pending) {
        dayOf(m);
        out.push([`p${cid}`, messageNode(`p${cid}`, m)]);
      }
    } else {
      out.push(["newer", marker("newer", "newer", null, (li) => {
        const b = Object.assign(document.createElement("button"), { type: "button", className: "small", textContent: "Jump to the latest messages" });
        b.addEventListener("click", jumpToLatest);
        li.append(b);
      })]);
    }
    return out;
  }

  function render() {
    // Keep what the person is looking at in place: the first message in view.
    let anchor = null;
    let anchorTop = 0;
    const top = list.getBoundingClientRect().top;
    if (!stick && !nearBottom()) {
      for (const li of list.children) {
        if (li.classList.contains("message") && li.getBoundingClientRect().bottom > top) {
          anchor = li;
          anchorTop = li.getBoundingClientRect().top;
          break;
        }
      }
    }
    const stickBottom = stick === "bottom" || (!stick && attached() && nearBottom());
    const want = desired();
    const keep = new Set(want.map(([key]) => key));
    for (const [key, node] of nodes) {
      if (!keep.has(key)) {
        node.remove();
        nodes.delete(key);
      }
    }
    let cursor = list.firstElementChild;
    for (const [, node] of want) {
      if (node === cursor) cursor = cursor.nextElementSibling;
      else list.insertBefore(node, cursor);
    }
    dirty.clear();
    // Decorations (read markers) before the scroll is placed: drawn after it, a
    // marker under the newest message was left below the view.
    afterRender(list, { attached: attached() });
    if (stick === "target" && target !== null) {
      const el = list.querySelector(`li.message[data-seq="${target}"]`);
      if (el) {
        el.scrollIntoView({ block: "center" });
        el.tabIndex = -1;
        el.focus({ preventScroll: true });
      }
    } else if (stick === "divider" && nodes.get("new")) nodes.get("new").scrollIntoView({ block: "start" });
    else if (stickBottom) list.scrollTop = list.scrollHeight;
    else if (anchor && anchor.isConnected) list.scrollTop += anchor.getBoundingClientRect().top - anchorTop;
    stick = null;
    if (focusAfter) {
      const el = list.querySelector(focusAfter);
      focusAfter = null;
      if (el) el.focus();
    }
    noteNewest();
    schedule(edges);
  }

  // -- moving the window -------------------------------------------------------
  function edges() {
    const [lo, hi] = indices();
    const len = timeline.size;
    // The next older page is asked for ahead of time, while the window still has
    // loaded messages above it to move through.
    if (lo < 2 * PAGE && timeline.hasOlder && !loading && list.scrollTop < EDGE * 4) loadOlder();
    if (list.scrollTop < EDGE) {
      if (lo > 0) {
        const newLo = Math.max(0, lo - (list.scrollTop === 0 ? LEAP : STEP));
        setWindow(newLo, Math.min(hi, newLo + WINDOW));
        return schedule(render);
      }
      return;
    }
    if (!attached() && list.scrollHeight - list.scrollTop - list.clientHeight < EDGE) {
      const newHi = Math.min(len, hi + (nearBottom() ? LEAP : STEP));
      setWindow(Math.max(lo, newHi - WINDOW), newHi);
      return schedule(render);
    }
    if (attached() && hi - lo > WINDOW && nearBottom()) {
      setWindow(hi - WINDOW, hi); // the live end grew: drop from the top
      schedule(render);
    } else if (attached() && hi - lo > WINDOW + STEP) {
      setWindow(lo, lo + WINDOW); // reading far up while messages arrive: stop growing
      schedule(render);
    }
  }

  async function loadOlder() {
    loading = true;
    try {
      const page = await api.messages(room, { before: timeline.oldestSeq ?? undefined, limit: PAGE });
      timeline.prepend(page);
      schedule(render);
    } catch (err) {
      // Too fast (the replay budget) or offline: try again later.
      const wait = Math.max(1000, (err.retryAfter || 0) * 1000);
      await new Promise((resolve) => setTimeout(resolve, wait));
      schedule(edges);
    } finally {
      loading = false;
    }
  }

  function jumpToLatest() {
    const len = timeline.size;
    setWindow(Math.max(0, len - WINDOW), len);
    stick = "bottom";
    schedule(render);
  }

  list.addEventListener("scroll", () => {
    noteNewest();
    schedule(edges);
  }, { passive: true });

  // The list's own size changes (a notice above the composer when signed out or
  // removed, a phone's keyboard, a resized window that wraps the messages again):
  // a view that was right at the newest message stays at it, where the browser
  // would keep the top still and let the change hide the bottom. "Right at": at
  // the bottom when it last scrolled or was drawn, not merely near it (a page
  // opened at a search result or the unread divider stays where it was put).
  let atNewest = false;
  function noteNewest() {
    atNewest = attached() && fromBottom() <= 2;
  }
  if (typeof ResizeObserver !== "undefined") {
    new ResizeObserver(() => {
      if (atNewest && stick === null) list.scrollTop = list.scrollHeight;
    }).observe(list);
  }

  // -- edits and deletes -------------------------------------------------------
  function save(key, m, body) {
    editing.delete(m.id);
    focusAfter = `li[data-key="${key}"] .actions button`;
    redraw(key);
    if (!body.trim() || body === m.body) return;
    client.edit(room, m.id, body).catch((err) => {
      problems.set(m.id, `Could not edit: ${err.message}`);
      redraw(key);
    });
  }

  function remove(key, m) {
    confirming.delete(m.id);
    redraw(key);
    client.remove(room, m.id).catch((err) => {
      problems.set(m.id, `Could not delete: ${err.message}`);
      redraw(key);
    });
  }

  // -- what the client tells -----------------------------------------------------
  return {
    timeline,
    /** The room's history arrived (on opening, or again after a reset). */
    snapshot(snap, readAt, at = null) {
      timeline.load(snap);
      const items = timeline.items;
      const len = items.length;
      const found = !opened && at !== null ? items.findIndex((m) => m.seq === at) : -1;
      if (found !== -1) {
        // Opened from a search result: the window around that message, in view.
        target = at;
        const lo = Math.max(0, found - 50);
        setWindow(lo, Math.min(len, lo + WINDOW));
        stick = "target";
      } else if (!opened && readAt !== null) {
        const first = items.findIndex((m) => m.seq > readAt && m.author !== me);
        if (first > 0 || (first === 0 && readAt > 0)) {
          divider = items[first].seq;
          const lo = Math.max(0, first - 20);
          setWindow(lo, Math.min(len, lo + WINDOW));
          stick = "divider";
        }
      }
      if (stick !== "divider" && stick !== "target") {
        setWindow(Math.max(0, len - WINDOW), len);
        stick = "bottom";
      }
      opened = true;
      for (const key of nodes.keys()) if (key.startsWith("m")) dirty.add(key);
      schedule(render);
    },
    event(ev) {
      const id = timeline.apply(ev);
      if (id === null) return;
      if (ev.type === "message.deleted") {
        editing.delete(id);
        confirming.delete(id);
      }
      redraw(`m${id}`);
    },
    acked(m) {
      if (timeline.acked(m)) redraw(`m${m.id}`);
    },
    /** Our sends: shown after the stored messages until stored or failed. */
    setPending(cid, m) {
      if (m) pending.set(cid, m);
      else pending.delete(cid);
      redraw(`p${cid}`);
    },
    pending,
    jumpToLatest,
    /** No more acting on messages (removed from the room, signed out): no React,
     * Edit or Delete, no reacting by a chip, and any open edit or "delete?" closed. */
    readOnly() {
      canPost = canModerate = canReact = false;
      editing.clear();
      confirming.clear();
      for (const key of nodes.keys()) if (key.startsWith("m")) dirty.add(key);
      schedule(render);
    },
    /** Draw what goes on rendered messages from elsewhere again (read markers). */
    decorate: () => {
      afterRender(list, { attached: attached() });
      if (atNewest) list.scrollTop = list.scrollHeight; // a marker come under the newest message stays in view
    },
  };
}
