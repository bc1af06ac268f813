// Unit tests of the chat page's pure parts for rooms, DMs, reactions, mentions and
// search: static/realtime/ui/{roomlist,reactions,snippet,mentionbox,members,
// roomdialogs,notify}.js and format.js's @mentions.
import { test } from "node:test";
import assert from "node:assert/strict";
import { badges, countText, dmName, pageTitle, roomLabel, sidebarGroups, totalUnread } from "../../static/realtime/ui/roomlist.js";
import { applyReaction, chipLabel, chips, cleanEmoji } from "../../static/realtime/ui/reactions.js";
import { resultHref, snippetNodes, snippetText } from "../../static/realtime/ui/snippet.js";
import { mentionQuery, personQuery, suggest } from "../../static/realtime/ui/mentionbox.js";
import { assignableRoles } from "../../static/realtime/ui/members.js";
import { parseUsernames } from "../../static/realtime/ui/roomdialogs.js";
import { worthNotifying } from "../../static/realtime/ui/notify.js";
import { splitMentions, tokenize, withMentions } from "../../static/realtime/ui/format.js";
import { Timeline } from "../../static/realtime/ui/timeline.js";

const room = (slug, extra = {}) => ({ slug, title: slug, kind: "room", is_public: true, role: "member", unread: 0, mentions: 0, ...extra });

test("a DM is named by the other people, sorted, never by me", () => {
  assert.equal(dmName(["alice", "carol", "bob"], "alice"), "bob, carol");
  assert.equal(dmName(["bob", "alice", "bob"], "alice"), "bob");
  assert.equal(roomLabel({ kind: "dm", slug: "dm-1", title: "bob, carol" }), "bob, carol");
  assert.equal(roomLabel(room("ops")), "#ops");
});

test("the sidebar lists rooms one is in (and the open one) apart from DMs", () => {
  const rooms = [room("ops"), room("general", { role: null }), room("random", { role: null }),
    { ...room("dm-2"), kind: "dm", title: "carol" }, { ...room("dm-1"), kind: "dm", title: "bob" }];
  const groups = sidebarGroups(rooms, "general");
  assert.deepEqual(groups.rooms.map((r) => r.slug), ["general", "ops"]);
  assert.deepEqual(groups.dms.map((r) => r.title), ["bob", "carol"]);
});

test("badges: unread count, a distinct @ mention badge, and what is read out", () => {
  assert.deepEqual(badges({ unread: 0, mentions: 0 }), { unread: null, mentions: null, spoken: "" });
  assert.deepEqual(badges({ unread: 3, mentions: 2 }), { unread: "3", mentions: "@2", spoken: ", 3 unread, 2 mentions" });
  assert.equal(badges({ unread: 1, mentions: 1 }).spoken, ", 1 unread, 1 mention");
  assert.equal(countText(120), "99+");
  assert.equal(badges({ unread: 150 }).unread, "99+");
});

test("the tab's title counts the unread of the other rooms", () => {
  const counts = new Map([["general", { unread: 5 }], ["ops", { unread: 2 }], ["dm-1", { unread: 1 }]]);
  assert.equal(totalUnread(counts, "general"), 3);
  assert.equal(pageTitle(3, "#general"), "(3) #general · Realtime");
  assert.equal(pageTitle(0, "#general"), "#general · Realtime");
  assert.equal(pageTitle(150, "bob", ""), "(99+) bob");
});

test("reaction chips: counts in first-use order, ours marked, deltas applied once", () => {
  let r = { "👍": ["bob"], "🎉": ["alice", "carol"] };
  assert.deepEqual(chips(r, "alice"), [
    { emoji: "👍", count: 1, mine: false, users: ["bob"] },
    { emoji: "🎉", count: 2, mine: true, users: ["alice", "carol"] },
  ]);
  r = applyReaction(r, { type: "reaction.added", emoji: "👍", user: "alice" });
  r = applyReaction(r, { type: "reaction.added", emoji: "👍", user: "alice" }); // a repeat
  assert.deepEqual(r["👍"], ["bob", "alice"]);
  r = applyReaction(r, { type: "reaction.removed", emoji: "🎉", user: "alice" });
  r = applyReaction(r, { type: "reaction.removed", emoji: "🎉", user: "carol" });
  assert.deepEqual(Object.keys(r), ["👍"]);
  r = applyReaction(r, { type: "reaction.added", emoji: "👀", user: "bob" });
  assert.deepEqual(chips(r, "alice").map((c) => [c.emoji, c.count, c.mine]), [["👍", 2, true], ["👀", 1, false]]);
  assert.equal(chipLabel(chips(r, "alice")[0], "alice"), "👍 2: bob and you");
  assert.deepEqual(chips(undefined, "alice"), []);
});

test("a typed emoji: trimmed; empty, spaced or too long is refused", () => {
  assert.equal(cleanEmoji("  🎉 "), "🎉");
  assert.equal(cleanEmoji("👍🏽"), "👍🏽");
  assert.equal(cleanEmoji(""), null);
  assert.equal(cleanEmoji("a b"), null);
  assert.equal(cleanEmoji("x".repeat(33)), null);
});

test("the timeline applies reactions to the messages it holds, after their page", () => {
  const t = new Timeline();
  t.load({ seq: 5, has_more: false, messages: [{ id: 1, seq: 4, author: "bob", body: "hi", ts: "2024-01-01T00:00:00Z", reactions: { "👍": ["bob"] }, mentions: [] }] });
  assert.equal(t.apply({ type: "reaction.added", room: "r", seq: 5, id: 1, emoji: "👍", user: "alice" }), null); // in the page already
  assert.equal(t.apply({ type: "reaction.added", room: "r", seq: 6, id: 1, emoji: "👍", user: "alice" }), 1);
  assert.deepEqual(t.items[0].reactions, { "👍": ["bob", "alice"] });
  assert.equal(t.apply({ type: "reaction.added", room: "r", seq: 7, id: 99, emoji: "👍", user: "alice" }), null); // not held
  assert.equal(t.apply({ type: "message.edited", room: "r", seq: 8, id: 1, body: "hi @carol", edited_at: "x", mentions: ["carol"] }), 1);
  assert.deepEqual(t.items[0].mentions, ["carol"]);
});

test("search snippets: the matches marked, the rest text, never markup", () => {
  const made = [];
  const doc = {
    createDocumentFragment: () => ({ kids: [], appendChild(c) { this.kids.push(c); } }),
    createElement: (tag) => { const el = { tag, set innerHTML(_) { throw new Error("no innerHTML"); } }; made.push(el); return el; },
    createTextNode: (text) => ({ text }),
  };
  const parts = [{ text: "…the ", match: false }, { text: "Deploy", match: true }, { text: " <b>is</b> done", match: false }];
  const frag = snippetNodes(parts, doc);
  assert.deepEqual(frag.kids.map((k) => (k.tag ? [k.tag, k.textContent] : k.text)), ["…the ", ["mark", "Deploy"], " <b>is</b> done"]);
  assert.equal(snippetText(parts), "…the Deploy <b>is</b> done");
  assert.equal(resultHref({ room: "ops", seq: 42, id: 7 }), "/rooms/ops/?at=42#m7");
});

test("@mentions: only the names the server resolved, by its rule, not in code", () => {
  assert.deepEqual(splitMentions("hi @Bob and @nobody, mail bob@example.com", new Set(["bob"])), [
    { type: "text", text: "hi " }, { type: "mention", user: "bob", text: "@Bob" }, { type: "text", text: " and @nobody, mail bob@example.com" },
  ]);
  assert.deepEqual(splitMentions("@bob.", new Set(["bob"])).map((t) => t.type), ["mention", "text"]);
  const tokens = withMentions(tokenize("**@bob** `@bob`"), ["bob"]);
  assert.deepEqual(tokens, [{ type: "strong", children: [{ type: "mention", user: "bob", text: "@bob" }] }, { type: "text", text: " " }, { type: "code", text: "@bob" }]);
  assert.deepEqual(withMentions(tokenize("@bob"), []), [{ type: "text", text: "@bob" }]);
});

test("@-autocomplete: the prefix at the caret, and members who match", () => {
  assert.deepEqual(mentionQuery("hello @bo", 9), { start: 6, prefix: "bo" });
  assert.deepEqual(mentionQuery("@", 1), { start: 0, prefix: "" });
  assert.equal(mentionQuery("mail bob@ex", 11), null);
  assert.equal(mentionQuery("hello bob", 9), null);
  assert.deepEqual(suggest(["carol", "Bob", "alice", "bobby"], "bo", "alice"), ["Bob", "bobby"]);
  assert.deepEqual(suggest(["carol", "alice"], "", "alice"), ["carol"]);
});

test("people picker: the last name being typed in a list of usernames", () => {
  assert.deepEqual(personQuery("bo", 2), { start: 0, prefix: "bo", length: 2 });
  assert.deepEqual(personQuery("bob, ca", 7), { start: 5, prefix: "ca", length: 2 });
  assert.deepEqual(personQuery("bob carol; @da", 14), { start: 11, prefix: "da", length: 3 });
  assert.deepEqual(personQuery("bob, carol", 3), { start: 0, prefix: "bob", length: 3 }); // the caret decides
  assert.equal(personQuery("bob, ", 5), null);
  assert.equal(personQuery("", 0), null);
});

test("who may give which role: owners any, moderators members and readers only", () => {
  assert.deepEqual(assignableRoles("owner", "moderator"), ["owner", "moderator", "member", "reader"]);
  assert.deepEqual(assignableRoles("moderator", "member"), ["member", "reader"]);
  assert.deepEqual(assignableRoles("moderator", "owner"), []);
  assert.deepEqual(assignableRoles("member", "reader"), []);
});

test("a DM's people typed as text; notifications for DMs and mentions only", () => {
  assert.deepEqual(parseUsernames(" @bob, carol  dave;bob "), ["bob", "carol", "dave"]);
  const kindOf = (slug) => (slug === "dm-1" ? "dm" : "room");
  const msg = (extra) => ({ type: "message.new", room: "general", author: "bob", body: "x", ...extra });
  assert.equal(worthNotifying(msg({}), "alice", kindOf), false);
  assert.equal(worthNotifying(msg({ mentions: ["Alice"] }), "alice", kindOf), true);
  assert.equal(worthNotifying(msg({ room: "dm-1" }), "alice", kindOf), true);
  assert.equal(worthNotifying(msg({ room: "dm-1", author: "alice" }), "alice", kindOf), false);
});

test("our own message, shown from its ack, gets its mentions from its event, once", () => {
  const t = new Timeline();
  t.load({ seq: 0, has_more: false, messages: [] });
  assert.equal(t.acked({ id: 5, seq: 1, author: "alice", body: "hi @bob", ts: "2024-01-01T00:00:00Z" }), true);
  const ev = { type: "message.new", room: "r", seq: 1, id: 5, author: "alice", body: "hi @bob", client_id: "c", ts: "2024-01-01T00:00:00Z", mentions: ["bob"] };
  assert.equal(t.apply(ev), 5);
  assert.deepEqual(t.items[0].mentions, ["bob"]);
  assert.equal(t.apply(ev), null);
});

test("Here now: names in order, at most eight, and the count's rest as others", async () => {
  const { hereNow } = await import("../../static/realtime/ui/presence.js");
  assert.equal(hereNow([], 0), "");
  assert.equal(hereNow(["bob", "alice"], 2), "Here now: alice, bob");
  assert.equal(hereNow(["bob", "alice"], 3), "Here now: alice, bob and 1 other");
  const many = Array.from({ length: 100 }, (_, i) => `u${String(i).padStart(3, "0")}`);
  assert.equal(hereNow(many, 5000), "Here now: u000, u001, u002, u003, u004, u005, u006, u007 and 4,992 others");
  assert.equal(hereNow(["a", "b"], 1), "Here now: a, b", "names we hold count, whatever a stale count says");
});

test("Read markers: under the newest message read, not under the reader's own, not past what is shown", async () => {
  const { readerPlacement } = await import("../../static/realtime/ui/presence.js");
  const shown = [{ seq: 3, author: "alice" }, { seq: 4, author: "bob" }, { seq: 6, author: "alice" }];
  const at = (markers, attached) => Object.fromEntries(readerPlacement(shown, new Map(Object.entries(markers)), attached));
  assert.deepEqual(at({ carol: 4, dave: 5, bob: 9 }), { 1: ["carol", "dave"], 2: ["bob"] });
  // alice read to her own newest message: her writing it says so, no "Seen by alice" under it.
  assert.deepEqual(at({ alice: 6, bob: 6 }), { 2: ["bob"] });
  assert.deepEqual(at({ alice: 4 }), { 1: ["alice"] }, "bob's message, read by alice");
  assert.deepEqual(at({ carol: 2 }), {}, "read to before the first shown");
  assert.deepEqual(at({ carol: 9 }, false), {}, "read past the shown page of an older stretch");
  assert.deepEqual(at({ carol: 9 }, true), { 2: ["carol"] });
});

test("Presence once stopped (signed out, removed): nothing drawn, whatever comes after", async () => {
  const { bindPresence } = await import("../../static/realtime/ui/presence.js");
  const handlers = {};
  const client = { on: (name, fn) => { handlers[name] = fn; }, presencePage: async () => null, typing() {} };
  const presenceLine = { textContent: "", dataset: {} };
  const typingLine = { textContent: "" };
  const queued = [];
  const presence = bindPresence(client, {
    room: "general", user: "alice", presenceLine, typingLine, schedule: (job) => queued.push(job), onMarkers() {},
  });
  const run = () => { while (queued.length) queued.shift()(); };
  handlers.ephemeral({ room: "general", type: "presence.state", users: ["alice", "bob"], count: 2 });
  handlers.ephemeral({ room: "general", type: "typing", user: "bob" });
  run();
  assert.equal(presenceLine.textContent, "Here now: alice, bob");
  assert.equal(typingLine.textContent, "bob is typing…");
  // A diff's draw is scheduled, then the page is signed out before it runs.
  handlers.ephemeral({ room: "general", type: "presence.diff", joins: ["carol"], leaves: [], count: 3 });
  presence.stop();
  assert.equal(presenceLine.textContent, "");
  run();
  handlers.ephemeral({ room: "general", type: "presence.state", users: ["bob"], count: 1 });
  run();
  assert.equal(presenceLine.textContent, "");
  assert.equal(typingLine.textContent, "");
  assert.equal(presenceLine.dataset.count, "0");
});
