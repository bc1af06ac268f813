// Unit tests of static/realtime/ui/format.js: the tokenizer, and DOM built only
// from createElement and text nodes (a fake document whose innerHTML throws).
import { test } from "node:test";
import assert from "node:assert/strict";
import { render, safeHref, tokenize } from "../../static/realtime/ui/format.js";

class FakeNode {
  constructor(tag) { this.tag = tag; this.children = []; this.attrs = {}; }
  appendChild(child) { this.children.push(child); return child; }
  set textContent(text) { this.children = [{ tag: "#text", text: String(text) }]; }
  set innerHTML(_) { throw new Error("innerHTML must never be used"); }
  set href(v) { this.attrs.href = v; }
  set rel(v) { this.attrs.rel = v; }
  set target(v) { this.attrs.target = v; }
}
const doc = {
  createElement: (tag) => new FakeNode(tag),
  createTextNode: (text) => ({ tag: "#text", text }),
  createDocumentFragment: () => new FakeNode("#fragment"),
};
// A compact picture of the built tree: text as strings, elements as [tag, ...children].
const shape = (node) => (node.tag === "#text" ? node.text : [node.tag, ...node.children.map(shape)]);
const html = (body) => render(body, doc).children.map(shape);

test("plain text stays one text token, markup and all", () => {
  assert.deepEqual(tokenize("<script>alert(1)</script>"), [{ type: "text", text: "<script>alert(1)</script>" }]);
  assert.deepEqual(html('<img src=x onerror="alert(2)">'), ['<img src=x onerror="alert(2)">']);
});

test("bold, italic, inline code and code blocks", () => {
  assert.deepEqual(html("a **b** *c* `d` e"), ["a ", ["strong", "b"], " ", ["em", "c"], " ", ["code", "d"], " e"]);
  assert.deepEqual(html("x\n```js\nlet a = **1**;\n<b>\n```\ny"), ["x\n", ["pre", ["code", "let a = **1**;\n<b>"]], "\ny"]);
  assert.deepEqual(html("`**not bold**`"), [["code", "**not bold**"]]);
  assert.deepEqual(html("**bold *and italic***"), [["strong", "bold ", ["em", "and italic"]]]);
});

test("links: http and https only, with rel and target, trailing punctuation left out", () => {
  assert.deepEqual(html("see https://example.com/a?b=1#c."), ["see ", ["a", "https://example.com/a?b=1#c"], "."]);
  const [, link] = render("go http://example.com/x_(y)) now", doc).children;
  assert.deepEqual(link.attrs, { href: "http://example.com/x_(y)", rel: "noopener noreferrer nofollow", target: "_blank" });
  assert.deepEqual(html("**see https://example.com/a_b**"), [["strong", "see ", ["a", "https://example.com/a_b"]]]);
});

test("javascript:, data: and other schemes stay text", () => {
  for (const hostile of ["javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,<script>alert(1)</script>",
    "vbscript:x", "[x](javascript:alert(1))", "https://javascript:alert(1)@", "//evil.example/"]) {
    for (const token of tokenize(hostile)) {
      if (token.type === "link") assert.match(token.href, /^https?:\/\//, hostile);
    }
    assert.ok(!tokenize(hostile).some((t) => t.type === "link" && !/^https?:/.test(t.href)), hostile);
  }
  assert.deepEqual(tokenize("javascript:alert(1)"), [{ type: "text", text: "javascript:alert(1)" }]);
  assert.equal(safeHref("javascript:alert(1)"), null);
  assert.equal(safeHref("data:text/html,x"), null);
  assert.equal(safeHref("https://example.com"), "https://example.com/");
});

test("unclosed and stray markers are text", () => {
  assert.deepEqual(html("**unclosed"), ["**unclosed"]);
  assert.deepEqual(html("a * b"), ["a * b"]);
  assert.deepEqual(html("* not a list*"), ["* not a list*"]);
  assert.deepEqual(html("2 * 3 * 4"), ["2 * 3 * 4"]);
  assert.deepEqual(html("```never closed\ncode"), ["```never closed\ncode"]);
  assert.deepEqual(html("`"), ["`"]);
  assert.deepEqual(html(""), []);
});

test("nesting is bounded", () => {
  const deep = "*".repeat(40) + "x" + "*".repeat(40);
  const tokens = tokenize(deep);
  let depth = 0;
  const walk = (ts, d) => ts.forEach((t) => { depth = Math.max(depth, d); if (t.children) walk(t.children, d + 1); });
  walk(tokens, 1);
  assert.ok(depth <= 4, `depth ${depth}`);
  assert.ok(JSON.stringify(tokens).includes("x"));
});

test("huge and adversarial input is handled in linear time", () => {
  for (const huge of ["*a ".repeat(100000), "**".repeat(100000), "`".repeat(100000), "https://x.io/".repeat(20000),
    "*".repeat(200000), "```".repeat(50000)]) {
    const started = performance.now();
    const tokens = tokenize(huge);
    const text = (ts) => ts.map((t) => t.text ?? (t.children ? text(t.children) : "")).join("");
    assert.ok(tokens.length > 0 && text(tokens).length <= huge.length);
    assert.ok(performance.now() - started < 1500, `${huge.slice(0, 6)}: ${performance.now() - started} ms`);
  }
});

test("every character of the body is shown (nothing dropped but the markers)", () => {
  const body = "a <b> **c** `d` e https://x.io/f g";
  const flat = (ts) => ts.map((t) => (t.children ? flat(t.children) : t.text)).join("");
  assert.equal(flat(tokenize(body)), "a <b> c d e https://x.io/f g");
});
