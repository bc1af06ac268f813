// @-autocomplete in the composer: typing "@" and the start of a name offers the
// room's members whose name starts so (a listbox under the box: Up and Down move,
// Enter or Tab takes one, Escape closes). The pure parts (mentionQuery, suggest)
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

export function bindMentionBox({ input, list, names, me }) {
  if (!input || !list) return;
  let options = [];
  let active = 0;
  let query = null;

  function close() {
    options = [];
    list.hidden = true;
    list.replaceChildren();
    input.removeAttribute("aria-activedescendant");
    input.setAttribute("aria-expanded", "false");
  }

  function draw() {
    list.replaceChildren(...options.map((name, i) => {
      const li = Object.assign(document.createElement("li"), { id: `mention-opt-${i}`, textContent: `@${name}` });
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
    if (options.length) input.setAttribute("aria-activedescendant", `mention-opt-${active}`);
  }

  function take(i) {
    if (!query || !options[i]) return close();
    const text = input.value;
    const end = query.start + 1 + query.prefix.length;
    const insert = `@${options[i]} `;
    input.value = text.slice(0, query.start) + insert + text.slice(end);
    const caret = query.start + insert.length;
    input.setSelectionRange(caret, caret);
    close();
  }

  input.setAttribute("aria-expanded", "false");
  input.addEventListener("input", () => {
    query = mentionQuery(input.value, input.selectionStart);
    options = query ? suggest(names(), query.prefix, me) : [];
    active = 0;
    if (options.length) draw();
    else close();
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
    e.stopImmediatePropagation(); // not a send
  }, { capture: true });
  input.addEventListener("blur", () => setTimeout(close, 100));
}
