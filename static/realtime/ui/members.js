// The open room's members: the count on the header's Members button and the
// panel (a dialog) that lists them with their roles. Owners and moderators add
// someone by username (suggested as they type), change roles and remove people (owners alone give, take or
// act on the owner and moderator roles, as the server's policy says); anyone may
// Leave (after a confirm; the last owner names the next one there). member.joined / member.left / member.role events keep
// it current; our own removal is told to the page (onRemoved).

import { bindDialog, confirmDialog, openDialog, showError } from "./dialog.js";
import { bindPeoplePicker } from "./mentionbox.js";

const ROLES = ["owner", "moderator", "member", "reader"];
const OWNER_ONLY = new Set(["owner", "moderator"]);

/** The roles `mine` may give to someone who has `theirs` now (null: not a member);
 * empty when `mine` may not change them at all. */
export function assignableRoles(mine, theirs) {
  if (mine === "owner") return ROLES;
  if (mine === "moderator" && !OWNER_ONLY.has(theirs)) return ["member", "reader"];
  return [];
}

export function bindMembers(client, { room, me, kind, role, api, onRemoved, onChange }) {
  const $ = (id) => document.getElementById(id);
  const dialog = bindDialog($("members-dialog"));
  const button = $("members-button");
  const members = new Map(); // username -> role
  let myRole = role;
  let loaded = false;

  const manages = () => kind !== "dm" && (myRole === "owner" || myRole === "moderator");

  function drawButton() {
    button.textContent = loaded ? `Members (${members.size})` : "Members";
    button.setAttribute("aria-label", loaded ? `Members of this room: ${members.size}` : "Members of this room");
  }

  function row(user, theirRole) {
    const li = document.createElement("li");
    li.dataset.user = user;
    const name = Object.assign(document.createElement("span"), { className: "member-name", textContent: user === me ? `${user} (you)` : user });
    li.append(name);
    const options = user === me ? [] : assignableRoles(myRole, theirRole);
    if (manages() && options.length) {
      const select = document.createElement("select");
      select.setAttribute("aria-label", `Role of ${user}`);
      for (const r of options) select.append(Object.assign(document.createElement("option"), { value: r, textContent: r, selected: r === theirRole }));
      select.addEventListener("change", async () => {
        showError($("members-error"), null);
        try {
          await api.setRole(room, user, select.value);
        } catch (err) {
          select.value = theirRole;
          showError($("members-error"), err);
        }
      });
      const remove = Object.assign(document.createElement("button"), { type: "button", className: "small danger", textContent: "Remove" });
      remove.setAttribute("aria-label", `Remove ${user}`);
      remove.addEventListener("click", () => confirmDialog(`Remove ${user} from this room?`, `Remove ${user}`, () => api.removeMember(room, user)));
      li.append(select, remove);
    } else {
      li.append(Object.assign(document.createElement("span"), { className: "role muted", textContent: theirRole }));
    }
    return li;
  }

  function draw() {
    drawButton();
    const sorted = [...members].sort(([a], [b]) => a.localeCompare(b));
    $("member-list").replaceChildren(...sorted.map(([u, r]) => row(u, r)));
    const form = $("add-member-form");
    form.hidden = !manages();
    const select = $("add-member-role");
    const roles = assignableRoles(myRole, null);
    if (select.options.length !== roles.length) {
      select.replaceChildren(...roles.map((r) => Object.assign(document.createElement("option"), { value: r, textContent: r, selected: r === "member" })));
    }
    const myRoleEl = $("my-role");
    if (myRoleEl && myRole) myRoleEl.textContent = myRole;
    if (onChange) onChange([...members.keys()]);
  }

  async function load() {
    const answer = await api.members(room);
    members.clear();
    for (const m of answer.members) members.set(m.user, m.role);
    loaded = true;
    draw();
  }

  button.addEventListener("click", () => {
    showError($("members-error"), null);
    $("members-title").textContent = kind === "dm" ? "People in this conversation" : `Members of #${room}`;
    openDialog(dialog, manages() ? $("add-member-name") : dialog.querySelector("[data-close]"));
    load().catch((err) => showError($("members-error"), err));
  });

  const picker = bindPeoplePicker({ input: $("add-member-name"), list: $("add-member-suggest"), lookup: api.people });
  $("add-member-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = $("add-member-name");
    const username = input.value.trim().replace(/^@/, "");
    if (!username) return showError($("members-error"), "Type a username.");
    showError($("members-error"), null);
    try {
      await api.addMember(room, username, $("add-member-role").value);
      input.value = "";
      picker.reset();
      input.focus();
    } catch (err) {
      showError($("members-error"), err);
    }
  });

  const leave = $("leave-button");
  if (leave) {
    leave.addEventListener("click", async () => {
      if (!loaded) await load().catch(() => {});
      const owners = [...members].filter(([, r]) => r === "owner").map(([u]) => u);
      const others = [...members.keys()].filter((u) => u !== me).sort((a, b) => a.localeCompare(b));
      let left;
      if (myRole === "owner" && owners.length === 1 && others.length) {
        // The last owner hands the room over on the way out (the server refuses
        // the last owner's leave: someone must be able to manage the room).
        left = await confirmDialog(`You are the last owner of #${room}. Leave it and make someone else its owner?`,
          "Hand over and leave", async (heir) => {
            await api.setRole(room, heir, "owner");
            await api.leave(room);
          }, { label: "New owner", options: others });
      } else {
        left = await confirmDialog(`Leave #${room}?`, "Leave", () => api.leave(room));
      }
      if (left) location.assign("/");
    });
  }
  const join = $("join-button");
  if (join) {
    join.addEventListener("click", async () => {
      join.disabled = true;
      try {
        await api.join(room);
        location.reload();
      } catch (err) {
        join.disabled = false;
      }
    });
  }

  client.on("event", (ev) => {
    if (ev.room !== room || !ev.type.startsWith("member.")) return;
    if (ev.type === "member.left") {
      members.delete(ev.user);
      if (ev.user === me && ev.by && ev.by !== me && onRemoved) onRemoved(ev.by);
    } else {
      members.set(ev.user, ev.role);
      if (ev.user === me) myRole = ev.role;
    }
    if (loaded) draw();
  });

  drawButton();
  load().catch(() => {});
  return { names: () => [...members.keys()], reload: load };
}
