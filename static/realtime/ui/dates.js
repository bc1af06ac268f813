// Dates and times of messages: the day a message belongs to (for day separators),
// the separator's label, the short time shown on a message (with its date when it
// is not from today) and the full date and time for its title. Local time, the
// browser's locale. No DOM code.

const pad = (n) => String(n).padStart(2, "0");

// Intl formatters are costly to make: one per locale and set of options.
const formatters = new Map();
function format(date, locale, options) {
  const key = `${locale}|${JSON.stringify(options)}`;
  let f = formatters.get(key);
  if (!f) formatters.set(key, (f = new Intl.DateTimeFormat(locale, options)));
  return f.format(date);
}

/** The local day of a date, "YYYY-MM-DD": messages of the same key share a day. */
export function dayKey(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

function daysBetween(a, b) {
  const start = (d) => new Date(d.getFullYear(), d.getMonth(), d.getDate()).getTime();
  return Math.round((start(b) - start(a)) / 86400000);
}

/** A day separator's label: "Today", "Yesterday", else the date in full (the year
 * only when it is not this year's). */
export function dayLabel(date, now = new Date(), locale = undefined) {
  const ago = daysBetween(date, now);
  if (ago === 0) return "Today";
  if (ago === 1) return "Yesterday";
  const options = { weekday: "long", day: "numeric", month: "long" };
  if (date.getFullYear() !== now.getFullYear()) options.year = "numeric";
  return format(date, locale, options);
}

/** The time shown on a message: "12:06" today, "3 Mar, 12:06" before (the year too
 * when it is not this year's). */
export function shortStamp(date, now = new Date(), locale = undefined) {
  const time = format(date, locale, { hour: "2-digit", minute: "2-digit" });
  if (daysBetween(date, now) === 0) return time;
  const options = { day: "numeric", month: "short" };
  if (date.getFullYear() !== now.getFullYear()) options.year = "numeric";
  return `${format(date, locale, options)}, ${time}`;
}

/** The full date and time (a message's title on hover). */
export function fullStamp(date, locale = undefined) {
  return format(date, locale, { dateStyle: "full", timeStyle: "medium" });
}
