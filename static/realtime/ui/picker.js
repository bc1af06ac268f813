// The reaction picker: one <dialog> for the page, opened from a message's React
// button: common emoji as buttons, or any emoji typed in (checked as the server
// checks it, reactions.js). Choosing one closes it; focus goes back to the button.

import { COMMON, cleanEmoji } from "./reactions.js";
import { bindDialog, openDialog, showError } from "./dialog.js";

export function bindPicker() {
  const $ = (id) => document.getElementById(id);
  const dialog = bindDialog($("picker-dialog"));
  const grid = $("picker-grid");
  let chosen = null; // the callback of the message it was opened for

  function choose(emoji) {
    const fn = chosen;
    chosen = null;
    dialog.close();
    if (fn) fn(emoji);
  }

  for (const emoji of COMMON) {
    const b = Object.assign(document.createElement("button"), { type: "button", className: "emoji-button", textContent: emoji });
    b.setAttribute("aria-label", `React with ${emoji}`);
    b.addEventListener("click", () => choose(emoji));
    grid.append(b);
  }
  $("picker-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const emoji = cleanEmoji($("picker-input").value);
    if (!emoji) return showError($("picker-error"), "Type one emoji (no spaces).");
    choose(emoji);
  });

  /** Open for a message: `label` says which ("alice's message from 12:06"). */
  return function pick(anchor, label, onChoose) {
    chosen = onChoose;
    $("picker-title").textContent = `React to ${label}`;
    $("picker-input").value = "";
    showError($("picker-error"), null);
    openDialog(dialog, grid.querySelector("button"));
  };
}
