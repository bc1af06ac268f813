// The sidebar's dialogs: "New room" (name, public or private, topic; the API's
// errors shown in the dialog), "Browse rooms" (public rooms one is not in, each
// with Join) and "New message" (a DM with one or more people). Each ends by
// opening the room it made, joined or found. The DM's "To" suggests people as
// one types (mentionbox.js).

import { bindDialog, openDialog, showError } from "./dialog.js";
import { bindPeoplePicker } from "./mentionbox.js";

const roomUrl = (slug) => `/rooms/${encodeURIComponent(slug)}/`;

/** "bob, carol dave" -> ["bob", "carol", "dave"] (a leading @ is dropped). */
export function parseUsernames(text) {
  return [...new Set(String(text).split(/[\s,;]+/).map((u) => u.replace(/^@/, "")).filter(Boolean))];
}

export function bindRoomDialogs({ api, me, go = (url) => location.assign(url) }) {
  const $ = (id) => document.getElementById(id);

  // -- new room --------------------------------------------------------------------
  const newRoom = bindDialog($("new-room-dialog"));
  const newRoomForm = $("new-room-form");
  $("new-room").addEventListener("click", () => {
    newRoomForm.reset();
    showError($("new-room-error"), null);
    $("new-room-name").removeAttribute("aria-invalid");
    openDialog(newRoom);
  });
  newRoomForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = $("new-room-name").value.trim();
    const visibility = newRoomForm.elements.visibility.value;
    const topic = $("new-room-topic").value.trim();
    if (!name) {
      $("new-room-name").setAttribute("aria-invalid", "true");
      return showError($("new-room-error"), "Give the room a name.");
    }
    const submit = newRoomForm.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const room = await api.createRoom(name, visibility, topic);
      newRoom.close();
      go(roomUrl(room.slug));
    } catch (err) {
      $("new-room-name").setAttribute("aria-invalid", String(err.code === "invalid" || err.code === "conflict" || err.code === "too_large"));
      showError($("new-room-error"), err);
    } finally {
      submit.disabled = false;
    }
  });

  // -- browse public rooms -----------------------------------------------------------
  const browse = bindDialog($("browse-dialog"));
  const browseList = $("browse-list");
  $("browse-rooms").addEventListener("click", async () => {
    browseList.replaceChildren();
    showError($("browse-error"), null);
    $("browse-status").textContent = "Loading…";
    openDialog(browse, browse.querySelector("[data-close]"));
    try {
      const { rooms } = await api.browse();
      $("browse-status").textContent = rooms.length ? `${rooms.length} public ${rooms.length === 1 ? "room" : "rooms"} you are not in` : "You are in every public room.";
      for (const r of rooms) browseList.append(browseItem(r));
      const first = browseList.querySelector("button");
      if (first) first.focus();
    } catch (err) {
      $("browse-status").textContent = "";
      showError($("browse-error"), err);
    }
  });

  function browseItem(r) {
    const li = document.createElement("li");
    const text = document.createElement("div");
    text.append(Object.assign(document.createElement("strong"), { textContent: r.title }), " ",
      Object.assign(document.createElement("span"), { className: "muted", textContent: `#${r.slug}` }));
    if (r.topic) text.append(Object.assign(document.createElement("div"), { className: "muted topic", textContent: r.topic }));
    const join = Object.assign(document.createElement("button"), { type: "button", className: "small", textContent: "Join" });
    join.setAttribute("aria-label", `Join #${r.slug}`);
    join.addEventListener("click", async () => {
      join.disabled = true;
      try {
        await api.join(r.slug);
        browse.close();
        go(roomUrl(r.slug));
      } catch (err) {
        showError($("browse-error"), err);
        join.disabled = false;
      }
    });
    li.append(text, join);
    return li;
  }

  // -- new direct message ------------------------------------------------------------
  const dm = bindDialog($("dm-dialog"));
  const dmForm = $("dm-form");
  const picker = bindPeoplePicker({ input: $("dm-users"), list: $("dm-suggest"), lookup: api.people, multiple: true });
  $("new-dm").addEventListener("click", () => {
    dmForm.reset();
    picker.reset();
    showError($("dm-error"), null);
    openDialog(dm);
  });
  dmForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const users = parseUsernames($("dm-users").value).filter((u) => u !== me);
    if (!users.length) return showError($("dm-error"), "Name at least one other person.");
    const submit = dmForm.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const room = await api.openDm(users);
      dm.close();
      go(roomUrl(room.slug));
    } catch (err) {
      showError($("dm-error"), err);
    } finally {
      submit.disabled = false;
    }
  });
}
