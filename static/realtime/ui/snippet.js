// Search results' pure parts: a result's snippet ([{text, match}], made by the
// server) as text nodes with the matches in <mark>, and the address that opens
// the room at the message. DOM built with createElement and text nodes only.

/** The snippet as nodes in a fragment: matches in <mark>, the rest as text. */
export function snippetNodes(parts, doc = globalThis.document) {
  const frag = doc.createDocumentFragment();
  for (const part of parts || []) {
    if (!part || !part.text) continue;
    if (part.match) {
      const mark = doc.createElement("mark");
      mark.textContent = part.text;
      frag.appendChild(mark);
    } else {
      frag.appendChild(doc.createTextNode(part.text));
    }
  }
  return frag;
}

/** The snippet as plain text (a link's accessible description). */
export function snippetText(parts) {
  return (parts || []).map((p) => p.text).join("");
}

/** Opens the room at the message: ?at=<seq> (the page loads back to it) and the
 * message's anchor. */
export function resultHref({ room, seq, id }) {
  return `/rooms/${encodeURIComponent(room)}/?at=${seq}#m${id}`;
}
