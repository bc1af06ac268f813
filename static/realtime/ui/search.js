// Message search (GET /api/v1/search/): the box in the sidebar opens a dialog of
// results, newest first, each with its room, author, date and the server's
// snippet with the matched words marked (snippet.js); "More results" pages on
// with the answer's `next`. A result opens its room at that message.

import { fullStamp, shortStamp } from "./dates.js";
import { bindDialog, openDialog, showError } from "./dialog.js";
import { resultHref, snippetNodes, snippetText } from "./snippet.js";

export function bindSearch({ api, room, labelOf }) {
  const $ = (id) => document.getElementById(id);
  const dialog = bindDialog($("search-dialog"));
  const results = $("search-results");
  const status = $("search-status");
  const more = $("search-more");
  let query = null; // {q, room, next}

  function item(r) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = resultHref(r);
    a.className = "result";
    const date = new Date(r.ts);
    const meta = Object.assign(document.createElement("span"), { className: "result-meta" });
    const time = Object.assign(document.createElement("time"), { dateTime: r.ts, title: fullStamp(date), textContent: shortStamp(date) });
    meta.append(Object.assign(document.createElement("strong"), { textContent: labelOf(r.room) }), " · ",
      Object.assign(document.createElement("span"), { className: "author", textContent: r.author }), " · ", time);
    const snippet = Object.assign(document.createElement("span"), { className: "snippet" });
    snippet.append(snippetNodes(r.snippet));
    a.append(meta, snippet);
    a.setAttribute("aria-label", `${labelOf(r.room)}, ${r.author}, ${shortStamp(date)}: ${snippetText(r.snippet)}`);
    a.addEventListener("click", (e) => {
      // The same room at the same message: the address does not change, open it again.
      const here = location.pathname + location.search;
      if (a.pathname + a.search === here) {
        e.preventDefault();
        location.hash = a.hash;
        location.reload();
      }
    });
    li.append(a);
    return li;
  }

  async function run(fresh) {
    showError(status, null);
    status.hidden = false;
    status.textContent = "Searching…";
    more.hidden = true;
    if (fresh) results.replaceChildren();
    try {
      const answer = await api.search(query.q, { room: query.room, before: fresh ? null : query.next });
      query.next = answer.next;
      for (const r of answer.results) results.append(item(r));
      const n = results.childElementCount;
      status.textContent = n === 0 ? `No messages match “${query.q}”.` : `${n}${answer.next ? "+" : ""} ${n === 1 ? "message matches" : "messages match"} “${query.q}”.`;
      more.hidden = !answer.next;
      if (!fresh && answer.results.length) results.children[n - answer.results.length].querySelector("a").focus();
    } catch (err) {
      status.classList.add("error");
      showError(status, err);
      return;
    }
    status.classList.remove("error");
  }

  function start(q) {
    q = q.trim();
    if (!q) return;
    $("search-dialog-q").value = q;
    query = { q, room: $("search-here").checked ? room : null, next: null };
    if (!dialog.open) openDialog(dialog, $("search-dialog-q"));
    run(true);
  }

  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    start($("search-q").value);
  });
  $("search-dialog-form").addEventListener("submit", (e) => {
    e.preventDefault();
    start($("search-dialog-q").value);
  });
  $("search-here").addEventListener("change", () => query && start(query.q));
  more.addEventListener("click", () => query && query.next && run(false));
}
