// The status area of the chat page: the badge that says at all times what the
// connection is doing, the buttons that go with it ("Retry now" while waiting to
// reconnect, "Reconnect" after an operator's disconnect, "Sign in again" when the
// session ended), and a separate live region that announces changes of state only
// (the badge's "reconnecting in N s" countdown is not re-announced every second).

import { State } from "../state.js";

// Failed attempts in a row after which the badge says the server is unreachable.
export const UNREACHABLE_AFTER = 4;

export function loginHref(loginUrl) {
  return `${loginUrl}?next=${encodeURIComponent(location.pathname)}`;
}

/** What the badge says (and the live region, without the countdown). */
export function describe({ state, reason, attempts = 0 }) {
  if (state === State.OPEN) return "connected";
  if (state === State.CONNECTING) return "connecting";
  if (state === State.OFFLINE) return "offline";
  if (state === State.FALLBACK) return "connected (long polling)";
  if (state === State.CLOSED) {
    if (reason === "unauthenticated") return "signed out";
    if (reason === "operator") return "disconnected by an administrator";
    return "disconnected";
  }
  return attempts >= UNREACHABLE_AFTER ? "server unreachable" : "reconnecting";
}

export function bindStatus(client, { badge, live, actions, loginUrl, onStop }) {
  let countdown = null;
  let announced = "";

  const button = (label, onClick) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "small";
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  };

  client.on("state", (detail) => {
    const { state, at, reason } = detail;
    if (countdown) clearInterval(countdown);
    countdown = null;
    badge.dataset.state = state;
    const said = describe(detail);
    if (said !== announced) {
      announced = said;
      live.textContent = said; // a change of state: announced once
    }
    actions.replaceChildren();
    if (state === State.RECONNECTING || state === State.OFFLINE) {
      actions.append(button("Retry now", () => client.retryNow()));
    } else if (state === State.CLOSED && reason === "operator") {
      actions.append(button("Reconnect", () => client.retryNow()));
    } else if (state === State.CLOSED && reason === "unauthenticated") {
      const a = Object.assign(document.createElement("a"), { href: loginHref(loginUrl), textContent: "Sign in again" });
      a.id = "sign-in-again";
      actions.append(a);
    }
    if (state === State.RECONNECTING && at) {
      const tick = () => {
        const secs = Math.max(0, Math.ceil((at - Date.now()) / 1000));
        if (secs <= 0) badge.textContent = said;
        else badge.textContent = said === "reconnecting" ? `reconnecting in ${secs}s` : `${said} · retrying in ${secs}s`;
      };
      tick();
      countdown = setInterval(tick, 1000);
    } else {
      badge.textContent = said;
    }
    if (state === State.CLOSED && onStop) onStop(reason);
  });
}
