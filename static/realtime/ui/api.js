// The REST calls the chat page makes: history pages, the long-polling fallback's
// polls and writes, the room list's counts, and typing while polling.
// Errors come as {status, code, message, retryAfter}, as the client expects them.

export function makeApi(apiBase) {
  const roomPath = (slug) => `${apiBase}rooms/${encodeURIComponent(slug)}/`;

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  async function restError(res) {
    let body = {};
    try {
      body = await res.json();
    } catch (err) {
      /* not JSON (a proxy's error page) */
    }
    return Object.assign(new Error(body.message || body.detail || `HTTP ${res.status}`), {
      status: res.status,
      code: res.status === 401 || (res.status === 403 && !body.code) ? "unauthenticated" : body.code,
      retryAfter: body.retry_after || Number(res.headers.get("Retry-After")) || 0,
    });
  }

  async function get(url, signal) {
    const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, signal });
    if (!res.ok) throw await restError(res);
    return res.json();
  }

  async function write(method, url, payload, { keepalive = false } = {}) {
    const res = await fetch(url, {
      method,
      keepalive,
      credentials: "same-origin",
      headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      body: payload === undefined ? undefined : JSON.stringify(payload),
    });
    if (!res.ok) throw await restError(res);
    return res.status === 204 ? null : res.json();
  }

  return {
    /** A page of history, newest last: {seq, epoch, has_more, messages}. */
    messages(slug, { before = null, limit = 100 } = {}) {
      const params = new URLSearchParams({ limit: String(limit) });
      if (before !== null) params.set("before", String(before));
      return get(`${roomPath(slug)}messages/?${params}`);
    },
    /** The fallback's long poll of a room's events. */
    poll(slug, since, wait, signal, limit, epoch, extra) {
      const params = new URLSearchParams({ since: String(since), wait: String(wait) });
      if (limit) params.set("limit", String(limit));
      if (epoch) params.set("epoch", epoch);
      if (extra && extra.client) params.set("client", extra.client);
      if (extra && extra.presenceTag) params.set("presence_tag", extra.presenceTag);
      return get(`${roomPath(slug)}events/?${params}`, signal);
    },
    post: (slug, body, clientId) => write("POST", `${roomPath(slug)}messages/`, { body, client_id: clientId }),
    edit: (slug, id, body) => write("PATCH", `${roomPath(slug)}messages/${id}/`, { body }),
    remove: (slug, id) => write("DELETE", `${roomPath(slug)}messages/${id}/`),
    read: (slug, seq) => write("POST", `${roomPath(slug)}read/`, { seq }),
    react: (slug, id, emoji, add) => write(add ? "POST" : "DELETE", `${roomPath(slug)}messages/${id}/reactions/`, { emoji }),
    /** Every visible room with {slug, title, kind, topic, is_public, role, seq, read, unread, mentions}. */
    rooms: () => get(`${apiBase}rooms/`),
    /** The public rooms this user is not in (to join). */
    browse: () => get(`${apiBase}rooms/?browse=public`),
    createRoom: (name, visibility, topic) => write("POST", `${apiBase}rooms/`, { name, visibility, topic }),
    join: (slug) => write("POST", `${roomPath(slug)}join/`),
    leave: (slug) => write("POST", `${roomPath(slug)}leave/`),
    members: (slug) => get(`${roomPath(slug)}members/`),
    addMember: (slug, username, role) => write("POST", `${roomPath(slug)}members/`, { username, role }),
    setRole: (slug, username, role) => write("PATCH", `${roomPath(slug)}members/${encodeURIComponent(username)}/`, { role }),
    removeMember: (slug, username) => write("DELETE", `${roomPath(slug)}members/${encodeURIComponent(username)}/`),
    openDm: (users) => write("POST", `${apiBase}dms/`, { users }),
    /** Usernames that start with `q` (the pickers): a list, never our own. */
    people: (q) => get(`${apiBase}people/?${new URLSearchParams({ q })}`).then((answer) => answer.people),
    search(q, { room = null, before = null } = {}) {
      const params = new URLSearchParams({ q });
      if (room) params.set("room", room);
      if (before) params.set("before", String(before));
      return get(`${apiBase}search/?${params}`);
    },
    /** A polling page is going: leave the room's presence now. keepalive: it is sent
     * even as the page unloads. */
    pollLeave: (slug, client) => write("POST", `${roomPath(slug)}presence/leave/`, { client }, { keepalive: true }),
    /** Say we are typing (while polling): {room, sent}. */
    typing: (slug) => write("POST", `${roomPath(slug)}typing/`),
  };
}
