// Desktop notifications for a mention of this user or a direct message, while the
// tab is hidden, when the person turned them on. Permission is asked only from
// the bell button's click (browsers ignore, and people resent, a prompt on load).
// The choice is kept per browser (localStorage).

const KEY = "realtime.notify";

/** Whether a message deserves a notification: by someone else, and a DM or one
 * that mentions `me`. */
export function worthNotifying(ev, me, kindOf) {
  if (ev.type !== "message.new" || ev.author === me) return false;
  if (kindOf(ev.room) === "dm") return true;
  return (ev.mentions || []).some((u) => u.toLowerCase() === me.toLowerCase());
}

export function bindNotify(client, { me, button, kindOf, labelOf }) {
  const supported = typeof window.Notification === "function";
  let wanted = false;
  try {
    wanted = localStorage.getItem(KEY) === "on";
  } catch (err) {
    /* storage refused */
  }
  const on = () => supported && wanted && Notification.permission === "granted";

  function draw() {
    button.setAttribute("aria-pressed", String(on()));
    button.textContent = on() ? "🔔 Notifications on" : "🔕 Notify me";
    button.title = !supported ? "This browser has no notifications"
      : Notification.permission === "denied" ? "Notifications are blocked for this site in the browser's settings"
      : on() ? "Notify me of mentions and direct messages while this tab is hidden (click to turn off)"
      : "Notify me of mentions and direct messages while this tab is hidden";
    button.disabled = !supported || Notification.permission === "denied";
  }

  button.addEventListener("click", async () => {
    if (!supported) return;
    if (on()) wanted = false;
    else {
      wanted = true;
      if (Notification.permission === "default") await Notification.requestPermission();
    }
    try {
      localStorage.setItem(KEY, wanted ? "on" : "off");
    } catch (err) {
      /* kept for this page only */
    }
    draw();
  });

  client.on("event", (ev) => {
    if (!on() || document.visibilityState === "visible" || !worthNotifying(ev, me, kindOf)) return;
    const n = new Notification(`${ev.author} in ${labelOf(ev.room)}`, { body: ev.body.slice(0, 200), tag: `rt-${ev.room}-${ev.id}` });
    n.onclick = () => {
      window.focus();
      location.assign(`/rooms/${encodeURIComponent(ev.room)}/?at=${ev.seq}#m${ev.id}`);
    };
  });
  draw();
}
