// Suggestions under a text field: @-autocomplete in the composer (typing "@" and
// the start of a name offers the room's members whose name starts so) and the
// people pickers of the DM and "Add someone" fields (the server's people lookup).
// One listbox behaviour for both (bindSuggestBox: Up and Down move, Enter or Tab
// takes one, Escape closes). The pure parts (mentionQuery, personQuery, suggest)
// have no DOM code.

/** The "@prefix" being typed at the caret: {start, prefix}, or null. The "@" must
 * start a mention by the server's rule (not after a letter, digit, "_" or "@"). */
export function mentionQuery(text, caret) {
  const before = text.slice(0, caret);
  const m = /(?:^|[^\p{L}\p{N}_@])@([\p{L}\p{N}_.+-]{0,30})$/u.exec(before);
  if (!m) return null;
  return { start: caret - m[1].length - 1, prefix: m[1] };
}

/** Members whose name starts with prefix (any case), not `me`, at most `max`. */
export function suggest(names, prefix, me, max = 6) {
  const p = prefix.toLowerCase();
  return names.filter((n) => n !== me && n.toLowerCase().startsWith(p)).sort((a, b) => a.localeCompare(b)).slice(0, max);
}

/** The name being typed at the caret in a list of people ("bob, ca|"): {start,
 * prefix} of the last one, or null (nothing typed yet). A leading @ is part of it. */
export function personQuery(text, caret) {
  const m = /(?:^|[\s,;])(@?[\p{L}\p{N}_.+-]{1,30})$/u.exec(text.slice(0, caret));
  if (!m) return null;
  return { start: caret - m[1].length, prefix: m[1].replace(/^@/, ""), length: m[1].length };
}

/** @-autocomplete in the composer: the room's members (`names()`). */
export function bindMentionBox({ input, list, names, me }) {
  return bindSuggestBox({
    input, list, idPrefix: "mention-opt",
    query: (text, caret) => {
      const q = mentionQuery(text, caret);
      return q && { ...q, length: q.prefix.length + 1 };
    },
    options: (prefix) => suggest(names(), prefix, me),
    label: (name) => `@${name}`,
    insert: (name) => `@${name} `,
  });
}

/** A people picker on a field of usernames (a DM's "To", "Add someone"): the
 * people whose name starts with the one being typed, asked of the server
 * (`lookup(prefix)`: a promise of usernames), a moment after the typing stops. */
export function bindPeoplePicker({ input, list, lookup, multiple = false, delay = 150 }) {
  return bindSuggestBox({
    input, list, idPrefix: `${list.id}-opt`, delay,
    query: (text, caret) => (multiple ? personQuery(text, caret) : /\S/.test(text) ? { start: 0, prefix: text.trim().replace(/^@/, ""), length: text.length } : null),
    options: lookup,
    label: (name) => name,
    insert: (name) => (multiple ? `${name}, ` : name),
  });
}

/**
 * A listbox of suggestions under a text field (ARIA combobox): Up and Down move,
 * Enter or Tab takes one, Escape closes. `query(text, caret)` finds what is being
 * typed ({start, prefix, length}: the text from start, length long, is replaced);
 * `options(prefix)` gives the choices, or a promise of them (an answer that comes
 * after the typing moved on is dropped).
 */
function bindSuggestBox({ input, list, idPrefix, query: findQuery, options: choices, label, insert, delay = 0 }) {
  if (!input || !list) return { reset() {} };
  let options = [];
  let active = 0;
  let query = null;
  let asked = 0; // the latest lookup; older answers are dropped
  let timer = null;

  function close() {
    options = [];
    list.hidden = true;
    list.replaceChildren();
    input.removeAttribute("aria-activedescendant");
    input.setAttribute("aria-expanded", "false");
  }

  function draw() {
    list.replaceChildren(...options.map((name, i) => {
      const li = Object.assign(document.createElement("li"), { id: `${idPrefix}-${i}`, textContent: label(name) });
      li.setAttribute("role", "option");
      li.setAttribute("aria-selected", String(i === active));
      li.addEventListener("mousedown", (e) => {
        e.preventDefault(); // keep the focus in the box
        take(i);
      });
      return li;
    }));
    list.hidden = options.length === 0;
    input.setAttribute("aria-expanded", String(options.length > 0));
    if (options.length) input.setAttribute("aria-activedescendant", `${idPrefix}-${active}`);
  }

  function take(i) {
    if (!query || !options[i]) return close();
    const text = input.value;
    const chosen = insert(options[i]);
    input.value = text.slice(0, query.start) + chosen + text.slice(query.start + query.length);
    const caret = query.start + chosen.length;
    input.setSelectionRange(caret, caret);
    close();
  }

  function show(found, ticket) {
    if (ticket !== asked) return;
    options = found || [];
    active = 0;
    if (options.length) draw();
    else close();
  }

  input.setAttribute("aria-expanded", "false");
  input.setAttribute("aria-autocomplete", "list");
  input.setAttribute("aria-controls", list.id);
  input.addEventListener("input", () => {
    query = findQuery(input.value, input.selectionStart);
    const ticket = ++asked;
    clearTimeout(timer);
    if (!query || (delay && !query.prefix)) return show([], ticket);
    const ask = () => Promise.resolve(choices(query.prefix)).then((found) => show(found, ticket), () => show([], ticket));
    if (delay) timer = setTimeout(ask, delay);
    else ask();
  });
  input.addEventListener("keydown", (e) => {
    if (!options.length) return;
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      active = (active + (e.key === "ArrowDown" ? 1 : options.length - 1)) % options.length;
      draw();
    } else if (e.key === "Enter" || e.key === "Tab") {
      take(active);
    } else if (e.key === "Escape") {
      close();
    } else return;
    e.preventDefault();
    e.stopImmediatePropagation(); // not a send, not the dialog's Escape
  }, { capture: true });
  input.addEventListener("blur", () => setTimeout(close, 100));
  // The field was set or cleared by code (a form sent, a dialog opened): no list,
  // and no answer still on its way opens one.
  return {
    reset() {
      asked += 1;
      clearTimeout(timer);
      query = null;
      close();
    },
  };
}
