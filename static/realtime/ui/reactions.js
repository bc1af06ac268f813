// Reactions' pure logic: a message's reactions ({emoji: [usernames]}, as history
// pages give them) as chips, a live reaction.added/removed applied to them, and
// the check on a typed emoji. No DOM code.

export const COMMON = ["👍", "❤️", "😂", "🎉", "😮", "😢", "👀", "✅"];

/** Chips in the order the emoji were first used: {emoji, count, mine, users}. */
export function chips(reactions, me) {
  const out = [];
  for (const [emoji, users] of Object.entries(reactions || {})) {
    if (!users.length) continue;
    out.push({ emoji, count: users.length, mine: users.includes(me), users: [...users] });
  }
  return out;
}

/** The reactions after one event (a new object; the old one is left alone). One
 * reaction per person and emoji: a repeat changes nothing. */
export function applyReaction(reactions, { type, emoji, user }) {
  const next = { ...(reactions || {}) };
  const users = next[emoji] ? [...next[emoji]] : [];
  if (type === "reaction.added") {
    if (!users.includes(user)) users.push(user);
    next[emoji] = users;
  } else if (type === "reaction.removed") {
    const left = users.filter((u) => u !== user);
    if (left.length) next[emoji] = left;
    else delete next[emoji];
  }
  return next;
}

/** A typed emoji, trimmed, or null when it cannot be one (empty, spaces inside,
 * longer than the server's 32 characters). */
export function cleanEmoji(text) {
  const e = String(text ?? "").trim().normalize("NFC");
  if (!e || /\s/.test(e) || [...e].length > 32) return null;
  return e;
}

/** What a chip says to a screen reader: "👍 2: alice and you". */
export function chipLabel({ emoji, count, users }, me) {
  const names = users.map((u) => (u === me ? "you" : u));
  const who = names.length <= 1 ? names.join("") : `${names.slice(0, -1).join(", ")} and ${names.at(-1)}`;
  return `${emoji} ${count}: ${who}`;
}
