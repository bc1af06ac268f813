// Native <dialog> helpers shared by the page's dialogs: open one (modal, focus on
// its first field, back on the button that opened it when it closes), its Close
// buttons, an API error shown inline ({code, message} from the server), and a
// confirm dialog that answers with a promise (instead of window.confirm).

export function bindDialog(dialog) {
  for (const b of dialog.querySelectorAll("[data-close]")) b.addEventListener("click", () => dialog.close());
  // A click on the backdrop (outside the box) closes it too.
  dialog.addEventListener("click", (e) => {
    if (e.target === dialog) dialog.close();
  });
  return dialog;
}

export function openDialog(dialog, focus = null) {
  const opener = document.activeElement;
  if (!dialog.open) dialog.showModal();
  const first = focus || dialog.querySelector("input:not([type=hidden]):not([type=radio]), select, textarea, button:not([data-close])");
  if (first) first.focus();
  dialog.addEventListener("close", () => {
    // Back to the button that opened it (or, when that is hidden now, the list's toggle at phone width).
    const visible = (el) => el && el.isConnected && el.getClientRects().length > 0;
    const back = visible(opener) ? opener : document.getElementById("sidebar-toggle");
    if (visible(back)) back.focus();
  }, { once: true });
}

/** An API error as a sentence: the server's message, or what the status means. */
export function errorText(err) {
  if (!err) return "";
  if (err.code === "rate_limited") return `Too many at once; try again in ${Math.max(1, Math.round(err.retryAfter || 1))} s.`;
  if (err.code === "unauthenticated") return "You were signed out; sign in again.";
  return err.message || "Something went wrong; try again.";
}

export function showError(el, err) {
  if (!err) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  el.textContent = typeof err === "string" ? err : errorText(err);
  el.hidden = false;
}

/** Ask; resolves true when the person confirms. `run` (async) is done before the
 * dialog closes, and its error is shown in it (the person may cancel then). With
 * `choice` ({label, options}) the dialog also asks to pick one of `options`, and
 * `run` is given the one picked. */
export function confirmDialog(text, okLabel, run = null, choice = null) {
  const dialog = document.getElementById("confirm-dialog");
  const ok = document.getElementById("confirm-ok");
  const problem = document.getElementById("confirm-error");
  const slot = document.getElementById("confirm-choice");
  document.getElementById("confirm-text").textContent = text;
  ok.textContent = okLabel;
  showError(problem, null);
  let select = null;
  slot.replaceChildren();
  slot.hidden = !choice;
  if (choice) {
    select = Object.assign(document.createElement("select"), { id: "confirm-select" });
    for (const option of choice.options) select.append(Object.assign(document.createElement("option"), { value: option, textContent: option }));
    slot.append(Object.assign(document.createElement("label"), { htmlFor: select.id, textContent: choice.label }), select);
  }
  return new Promise((resolve) => {
    const onClick = async (e) => {
      e.preventDefault();
      if (!run) return dialog.close("ok");
      ok.disabled = true;
      try {
        await run(select ? select.value : undefined);
        dialog.close("ok");
      } catch (err) {
        showError(problem, err);
      } finally {
        ok.disabled = false;
      }
    };
    ok.addEventListener("click", onClick);
    dialog.addEventListener("close", () => {
      ok.removeEventListener("click", onClick);
      resolve(dialog.returnValue === "ok");
    }, { once: true });
    dialog.returnValue = "";
    openDialog(dialog, select || document.getElementById("confirm-cancel"));
  });
}
