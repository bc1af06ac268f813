// One message as DOM: author, time (its date too when it is not from today, the
// full date and time on hover), the formatted body, its state while pending or
// failed, and its actions: Edit (an inline box: Enter saves, Shift+Enter is a new
// line, Escape cancels), Delete (an inline confirm, not window.confirm) and Retry.
// Every button's accessible name says which message it acts on. Text goes in as
// text nodes only (format.js).

import { fullStamp, shortStamp } from "./dates.js";
import { render as formatBody } from "./format.js";
import { chipLabel, chips } from "./reactions.js";

function button(label, onClick, { className = "link", ariaLabel = null } = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = label;
  if (ariaLabel) b.setAttribute("aria-label", ariaLabel);
  b.addEventListener("click", onClick);
  return b;
}

/** "your message from 12:06" / "alice's message from 3 Mar, 12:06". */
export function describeMessage(m, me, now = new Date()) {
  const whose = m.author === me ? "your message" : `${m.author}'s message`;
  return m.ts ? `${whose} from ${shortStamp(new Date(m.ts), now)}` : whose;
}

/**
 * @param {object} m  the message ({id, seq, author, body, ts, edited_at, state, error, hint})
 * @param {object} ctx  {me, canPost, canModerate, editing: draft text or undefined,
 *   confirming: bool, problem: text or null, on: {edit, save, cancelEdit, remove,
 *   confirmRemove, cancelRemove, retry}}
 */
export function drawMessage(key, m, ctx) {
  const li = document.createElement("li");
  li.className = "message";
  li.dataset.key = key;
  li.dataset.state = m.state;
  if (m.id) li.dataset.id = m.id;
  if (m.seq) li.dataset.seq = m.seq;
  if (m.author) li.dataset.author = m.author;
  if (m.id) li.id = `m${m.id}`;
  if (m.author === ctx.me) li.classList.add("own");
  const mentionsMe = (m.mentions || []).some((u) => u.toLowerCase() === String(ctx.me).toLowerCase());
  if (mentionsMe) li.classList.add("mentions-me");
  if (ctx.target) li.classList.add("target");

  const meta = document.createElement("div");
  meta.className = "meta";
  const author = Object.assign(document.createElement("span"), { className: "author", textContent: m.author });
  const time = document.createElement("time");
  if (m.ts) {
    const date = new Date(m.ts);
    time.dateTime = m.ts;
    time.title = fullStamp(date);
    time.textContent = shortStamp(date);
  }
  meta.append(author, " ", time);
  if (m.edited_at) meta.append(" ", Object.assign(document.createElement("span"), { className: "muted", textContent: "(edited)" }));
  if (m.state !== "sent") {
    const st = document.createElement("span");
    st.className = `state ${m.state}`;
    st.textContent = m.state === "pending" ? "sending…" : `not sent: ${m.error || "error"}`;
    meta.append(" ", st);
  }
  li.append(meta);

  const label = describeMessage(m, ctx.me);
  if (ctx.editing !== undefined) {
    li.append(editForm(m, ctx, label));
  } else {
    const body = document.createElement("div");
    body.className = "body";
    body.append(formatBody(m.body, document, { mentions: m.mentions, me: ctx.me }));
    li.append(body);
    if (mentionsMe) body.prepend(Object.assign(document.createElement("span"), { className: "visually-hidden", textContent: "Mentions you: " }));
  }
  if (m.state === "sent" && m.id) {
    const row = reactionRow(m, ctx, label);
    if (row) li.append(row);
  }

  if (m.state === "sent" && m.id && ctx.editing === undefined) {
    const actions = document.createElement("div");
    actions.className = "actions";
    const mine = m.author === ctx.me;
    if (ctx.confirming) {
      actions.setAttribute("role", "group");
      actions.setAttribute("aria-label", `Delete ${label}?`);
      actions.append(
        Object.assign(document.createElement("span"), { textContent: "Delete this message? " }),
        button("Yes, delete", ctx.on.confirmRemove, { className: "small danger", ariaLabel: `Yes, delete ${label}` }),
        " ",
        button("Cancel", ctx.on.cancelRemove, { className: "link cancel", ariaLabel: `Keep ${label}` }),
      );
    } else {
      if (ctx.canReact) {
        const react = button("☺ React", () => ctx.on.pick(react, label), { className: "link react", ariaLabel: `Add a reaction to ${label}` });
        react.setAttribute("aria-haspopup", "dialog");
        actions.append(react);
      }
      if (mine && ctx.canPost) actions.append(button("Edit", ctx.on.edit, { ariaLabel: `Edit ${label}` }));
      if ((mine && ctx.canPost) || ctx.canModerate) actions.append(button("Delete", ctx.on.remove, { ariaLabel: `Delete ${label}` }));
    }
    if (actions.childElementCount) li.append(actions);
  }
  if (ctx.problem) {
    const p = Object.assign(document.createElement("div"), { className: "problem error", textContent: ctx.problem });
    p.setAttribute("role", "alert");
    li.append(p);
  }
  if (m.state === "failed") {
    if (m.hint) li.append(Object.assign(document.createElement("div"), { className: "hint muted", textContent: m.hint }));
    if (ctx.on.retry) li.append(button("Retry", ctx.on.retry, { ariaLabel: `Retry sending ${label}` }));
  }
  return li;
}

/** The chips under a message: emoji and count, pressed when one of them is ours;
 * a click takes ours back or adds it. */
function reactionRow(m, ctx, label) {
  const list = chips(m.reactions, ctx.me);
  if (!list.length) return null;
  const row = document.createElement("div");
  row.className = "reactions";
  row.setAttribute("role", "group");
  row.setAttribute("aria-label", `Reactions to ${label}`);
  for (const chip of list) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.dataset.emoji = chip.emoji;
    b.setAttribute("aria-pressed", String(chip.mine));
    b.title = chipLabel(chip, ctx.me);
    b.setAttribute("aria-label", chipLabel(chip, ctx.me));
    b.append(Object.assign(document.createElement("span"), { className: "emoji", textContent: chip.emoji }), " ",
      Object.assign(document.createElement("span"), { className: "count", textContent: String(chip.count) }));
    if (ctx.canReact) b.addEventListener("click", () => ctx.on.toggle(chip.emoji, chip.mine));
    else b.disabled = true;
    row.append(b);
  }
  return row;
}

function editForm(m, ctx, label) {
  const form = document.createElement("form");
  form.className = "edit";
  const area = document.createElement("textarea");
  area.value = ctx.editing;
  area.rows = Math.min(8, Math.max(2, ctx.editing.split("\n").length));
  area.setAttribute("aria-label", `Edit ${label}`);
  area.setAttribute("aria-describedby", "edit-keys");
  area.addEventListener("input", () => ctx.on.draft(area.value));
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    } else if (e.key === "Escape") {
      e.preventDefault();
      ctx.on.cancelEdit();
    }
  });
  const save = Object.assign(document.createElement("button"), { type: "submit", textContent: "Save", className: "small" });
  const hint = Object.assign(document.createElement("span"), { className: "muted", textContent: "Enter saves · Shift+Enter new line · Escape cancels" });
  hint.id = "edit-keys";
  form.append(area, save, " ", button("Cancel", ctx.on.cancelEdit), " ", hint);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    ctx.on.save(area.value);
  });
  return form;
}
