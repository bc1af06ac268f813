// Message formatting: a small tokenizer turns a body into tokens, and render()
// builds DOM nodes from them with createElement and text nodes, never innerHTML.
// Owns: ``` code blocks ```, `inline code`, **bold**, *italic*, links (http and
// https only; anything else, javascript: and data: included, stays text), and
// @mentions: an @name the server resolved (the message's `mentions`), found by the
// server's own rule (protocol.md), never one it did not.

const MAX_DEPTH = 3; // bold inside italic inside bold, and no deeper
const MAX_FORMATTED = 20000; // longer text is shown as plain text (and links)
const URL_RE = /https?:\/\/[^\s<>"]+/gi;
const TRAILING = /[.,;:!?'"\]}>*_]+$/;

/** The href for a candidate link: an absolute http(s) URL, else null. */
export function safeHref(text) {
  let url;
  try {
    url = new URL(text);
  } catch (err) {
    return null;
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

/** Split a link's trailing punctuation off (a sentence's full stop, a closing
 * parenthesis that has no opening one inside the link). */
function trimLink(candidate) {
  let link = candidate.replace(TRAILING, "");
  while (link.endsWith(")") && (link.match(/\(/g) || []).length < (link.match(/\)/g) || []).length) {
    link = link.slice(0, -1).replace(TRAILING, "");
  }
  return link;
}

/** Plain text with its links as link tokens. */
function linkify(text) {
  const out = [];
  let last = 0;
  URL_RE.lastIndex = 0;
  let match;
  while ((match = URL_RE.exec(text))) {
    const link = trimLink(match[0]);
    const href = safeHref(link);
    if (!href) continue;
    if (match.index > last) out.push({ type: "text", text: text.slice(last, match.index) });
    out.push({ type: "link", href, text: link });
    last = match.index + link.length;
    URL_RE.lastIndex = last;
  }
  if (last < text.length) out.push({ type: "text", text: text.slice(last) });
  return out;
}

const isSpace = (ch) => ch === undefined || /\s/.test(ch);

/** **bold** and *italic* in a run of text (no code in it), links inside. A marker
 * opens only before a non-space and closes only after one; an unmatched marker is
 * text. Linear: once no closer is found after a position, none is looked for again. */
function emphasis(text, depth) {
  if (depth > MAX_DEPTH || text.length > MAX_FORMATTED || !text.includes("*")) return linkify(text);
  const out = [];
  const noCloserFrom = { "*": Infinity, "**": Infinity };
  let buf = "";
  let i = 0;
  const flush = () => {
    if (buf) out.push(...linkify(buf));
    buf = "";
  };
  const closer = (marker, from) => {
    if (from >= noCloserFrom[marker]) return -1;
    for (let j = text.indexOf(marker, from); j !== -1; j = text.indexOf(marker, j + 1)) {
      const single = marker === "*";
      if (isSpace(text[j - 1])) continue;
      if (single && (text[j + 1] === "*" || text[j - 1] === "*")) continue; // part of **
      // "***" closing "**...*...***": the italic closes first, the bold on the last two.
      if (!single && text[j + 2] === "*") return j + 1;
      return j;
    }
    noCloserFrom[marker] = Math.min(noCloserFrom[marker], from);
    return -1;
  };
  while (i < text.length) {
    // A URL is copied as it is: its * or _ are not markers.
    if (text[i] === "h" && (text.startsWith("http://", i) || text.startsWith("https://", i))) {
      let j = i;
      while (j < text.length && !isSpace(text[j])) j++;
      buf += text.slice(i, j);
      i = j;
      continue;
    }
    if (text[i] !== "*") {
      buf += text[i++];
      continue;
    }
    const marker = text.startsWith("**", i) ? "**" : "*";
    const start = i + marker.length;
    const end = isSpace(text[start]) ? -1 : closer(marker, start + 1);
    if (end === -1) {
      buf += marker;
      i = start;
      continue;
    }
    flush();
    out.push({ type: marker === "**" ? "strong" : "em", children: emphasis(text.slice(start, end), depth + 1) });
    i = end + marker.length;
  }
  flush();
  return out;
}

/** Inline code spans (`...`, on one line) in text without code blocks. */
function inline(text) {
  const out = [];
  const re = /`([^`\n]+)`/g;
  let last = 0;
  let match;
  while ((match = re.exec(text))) {
    if (match.index > last) out.push(...emphasis(text.slice(last, match.index), 1));
    out.push({ type: "code", text: match[1] });
    last = re.lastIndex;
  }
  if (last < text.length) out.push(...emphasis(text.slice(last), 1));
  return out;
}

/** A body as tokens: {type: "text"|"code"|"pre", text}, {type: "link", href, text},
 * {type: "strong"|"em", children}. An unclosed ``` is text. */
export function tokenize(body) {
  const text = String(body ?? "");
  const out = [];
  const re = /```(?:[^\n`]*\n)?([\s\S]*?)```/g;
  let last = 0;
  let match;
  while ((match = re.exec(text))) {
    if (match.index > last) out.push(...inline(text.slice(last, match.index)));
    out.push({ type: "pre", text: match[1].replace(/\n$/, "") });
    last = re.lastIndex;
  }
  if (last < text.length) out.push(...inline(text.slice(last)));
  return out;
}

// "@" at the start or after a character that is not a letter, digit, "_" or "@";
// then a username: letters, digits, "_", with ".", "+", "-" inside it.
const MENTION_RE = /(?<![\p{L}\p{N}_@])@([\p{L}\p{N}_](?:[\p{L}\p{N}_.+-]*[\p{L}\p{N}_])?)/gu;

/** Text split around the @names in `names` (lowercased usernames). */
export function splitMentions(text, names) {
  if (!names.size || !text.includes("@")) return [{ type: "text", text }];
  const out = [];
  let last = 0;
  MENTION_RE.lastIndex = 0;
  let match;
  while ((match = MENTION_RE.exec(text))) {
    const user = match[1].toLowerCase();
    if (!names.has(user)) continue;
    if (match.index > last) out.push({ type: "text", text: text.slice(last, match.index) });
    out.push({ type: "mention", user, text: match[0] });
    last = match.index + match[0].length;
  }
  if (last < text.length) out.push({ type: "text", text: text.slice(last) });
  return out;
}

/** The tokens with the resolved @mentions of their text (not in code or links). */
export function withMentions(tokens, mentions) {
  const names = new Set((mentions || []).map((u) => String(u).toLowerCase()));
  if (!names.size) return tokens;
  const walk = (list) => list.flatMap((t) => {
    if (t.type === "text") return splitMentions(t.text, names);
    if (t.type === "strong" || t.type === "em") return [{ ...t, children: walk(t.children) }];
    return [t];
  });
  return walk(tokens);
}

function build(tokens, doc, parent, me) {
  for (const token of tokens) {
    if (token.type === "text") {
      parent.appendChild(doc.createTextNode(token.text));
    } else if (token.type === "link") {
      const a = doc.createElement("a");
      a.href = token.href;
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      a.textContent = token.text;
      parent.appendChild(a);
    } else if (token.type === "code") {
      const code = doc.createElement("code");
      code.textContent = token.text;
      parent.appendChild(code);
    } else if (token.type === "pre") {
      const pre = doc.createElement("pre");
      const code = doc.createElement("code");
      code.textContent = token.text;
      pre.appendChild(code);
      parent.appendChild(pre);
    } else if (token.type === "mention") {
      const span = doc.createElement("span");
      span.className = me && token.user === me.toLowerCase() ? "mention me" : "mention";
      span.textContent = token.text;
      parent.appendChild(span);
    } else {
      const el = doc.createElement(token.type === "strong" ? "strong" : "em");
      build(token.children, doc, el, me);
      parent.appendChild(el);
    }
  }
  return parent;
}

/** A body as a DocumentFragment of formatted nodes; `mentions` (the usernames
 * the server resolved) are highlighted, `me`'s own the more. */
export function render(body, doc = globalThis.document, { mentions = null, me = null } = {}) {
  return build(withMentions(tokenize(body), mentions), doc, doc.createDocumentFragment(), me);
}
