// The connection badge: says at all times what the client's state is.
import { State } from "./client.js";

export function bindBadge(client, badge, { loginUrl }) {
  let countdown = null;
  client.on("state", ({ state, at, reason }) => {
    if (countdown) clearInterval(countdown);
    countdown = null;
    badge.dataset.state = state;
    if (state === State.OPEN) badge.textContent = "connected";
    else if (state === State.CONNECTING) badge.textContent = "connecting";
    else if (state === State.OFFLINE) badge.textContent = "offline";
    else if (state === State.FALLBACK) badge.textContent = "connected (long polling)";
    else if (state === State.CLOSED) {
      badge.textContent = reason === "unauthenticated" ? "signed out" : reason === "forbidden" ? "access revoked" : "disconnected";
      if (reason === "unauthenticated") location.assign(`${loginUrl}?next=${encodeURIComponent(location.pathname)}`);
    } else if (state === State.RECONNECTING) {
      const tick = () => {
        const secs = Math.max(0, Math.ceil((at - Date.now()) / 1000));
        badge.textContent = secs > 0 ? `reconnecting in ${secs}s` : "reconnecting";
      };
      tick();
      countdown = setInterval(tick, 1000);
    }
  });
}
