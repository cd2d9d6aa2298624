// The dashboard's building blocks: DOM and formatting helpers, the API, confirmations and
// write buttons, and tables that update in place.
//
// Everything the broker hands us (task names, message bodies, headers, errors, tracebacks) is
// hostile. It reaches the page only as text: h() appends strings as text nodes and cells are set
// with textContent. Nothing here or in the views assigns innerHTML.

/** What the views share: the server's config, the view shown, the latest overview. */
export const app = { config: null, generation: 0, view: null, overview: null };

// --- DOM and formatting helpers ----------------------------------------------------------------

/** An element with properties and children; strings become text nodes, never markup. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "testid") el.dataset.testid = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "checked" || key === "disabled" || key === "value") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export const $ = (selector, root = document) => root.querySelector(selector);
export const numberFormat = new Intl.NumberFormat("en-US");

/** A count; null means the source could not tell (AMQP has no unacked count): "?". */
export function count(value) {
  if (value === null || value === undefined) return "?";
  // A header another program wrote may hold anything: shown as it is, not as NaN.
  return typeof value === "number" ? numberFormat.format(value) : String(value);
}

export function rate(value) {
  return value === null || value === undefined ? "–" : value.toFixed(1);
}

/** The last value of a series, or null. */
export function latest(values) {
  return values?.length ? values[values.length - 1] : null;
}

export function pad(n) {
  return String(n).padStart(2, "0");
}

/** An ISO time as local time: "16:05:03" today, "2026-11-26 16:05" before. */
export function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  const now = new Date();
  const time = `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
  if (t.toDateString() === now.toDateString()) return time;
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${time.slice(0, 5)}`;
}

export function timeCell(iso) {
  return h("time", { datetime: iso ?? "", title: iso ?? "" }, when(iso));
}

export function clip(text, limit = 120) {
  if (text === null || text === undefined) return "";
  const line = String(text).replace(/\s+/g, " ").trim();
  return line.length > limit ? `${line.slice(0, limit - 1)}…` : line;
}

export function link(href, text, props = {}) {
  return h("a", { href, ...props }, text);
}

export function hashFor(...parts) {
  return `#/${parts.map(encodeURIComponent).join("/")}`;
}

export function panel(title, ...children) {
  return h("section", { class: "panel" }, title ? h("h2", {}, title) : null, ...children);
}

export function empty(text) {
  return h("p", { class: "empty" }, text);
}

// A list of [label, value] pairs as label and value side by side; a missing value shows "–".
export function facts(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v || "–")]),
  );
}

// --- the API -----------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path, options = {}) {
  const response = await fetch(`api/${path}`, { cache: "no-store", ...options });
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page): the status line says enough.
  }
  if (!response.ok) {
    throw new ApiError(response.status, body?.error ?? `${response.status} ${response.statusText}`);
  }
  return body;
}

/** A write: JSON, and the header the server requires of every action (no cross-site forms). */
export function post(path, body = {}) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Amqtask-Action": "1" },
    body: JSON.stringify(body),
  });
}

// --- confirmations, notices, write buttons -------------------------------------------------------

/** Ask before a write; resolves true only when the user pressed Confirm. */
export function confirmAction(title, text, label = "Confirm") {
  const dialog = $("#confirm");
  $(".confirm-title", dialog).textContent = title;
  $(".confirm-text", dialog).textContent = text;
  $('[data-testid="confirm"]', dialog).textContent = label;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
    dialog.showModal();
    $('[data-testid="cancel"]', dialog).focus();
  });
}

export function notify(text, kind = "ok") {
  const note = h("div", { class: `toast ${kind}`, testid: "toast", role: "status" }, text);
  document.body.append(note);
  setTimeout(() => note.remove(), kind === "error" ? 8000 : 4000);
}

/** A button for a write action: disabled, with a reason, in read-only mode. */
export function actionButton(label, testid, onclick, extra = "") {
  const readOnly = app.config?.read_only;
  return h(
    "button",
    {
      class: `button ${extra}`.trim(),
      testid,
      type: "button",
      disabled: Boolean(readOnly),
      title: readOnly ? "read-only dashboard" : null,
      onclick,
    },
    label,
  );
}

/** Confirm, run the write, say what it did (or why not), refresh the view; true if it ran. */
export async function perform({ title, text, label, run, done }) {
  if (!(await confirmAction(title, text, label))) return false;
  let ok = false;
  try {
    const result = await run();
    notify(done(result));
    ok = true;
  } catch (error) {
    notify(`${title} failed: ${error.message}`, "error");
  }
  await app.view?.refresh?.().catch(() => {});
  return ok;
}

export function plural(n, word) {
  return `${numberFormat.format(n)} ${word}${n === 1 ? "" : "s"}`;
}

// --- tables that update in place (a poll never swaps the element under the pointer) -------------

/**
 * columns: [{title, testid?, num?, value(item) -> string | Node, className?(item), once?}]
 * (`once`: built when the row appears and kept, for checkboxes and buttons).
 * options: {key(item), rowTestid?(item), rowClass?(item), empty}
 */
export function dataTable(columns, options) {
  const body = h("tbody");
  const table = h(
    "table",
    { class: "data" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)),
      ),
    ),
    body,
  );
  const rows = new Map();

  function fill(cell, column, item) {
    const value = column.value(item);
    if (value instanceof Node) {
      // Same look as before: keep the element (a click may be under way on it).
      if (cell.childNodes.length !== 1 || !cell.firstChild.isEqualNode(value)) cell.replaceChildren(value);
    } else if (cell.textContent !== String(value ?? "")) cell.textContent = String(value ?? "");
    const className = [column.num ? "num" : "", column.className?.(item) ?? ""].join(" ").trim();
    if (cell.className !== className) cell.className = className;
  }

  function update(items) {
    const seen = new Set();
    let position = 0;
    for (const item of items) {
      const key = options.key(item);
      seen.add(key);
      let row = rows.get(key);
      if (!row) {
        row = h("tr", { testid: options.rowTestid?.(item) });
        for (const column of columns) {
          const cell = h("td", { testid: column.testid });
          if (column.once) fill(cell, column, item);
          row.append(cell);
        }
        rows.set(key, row);
      }
      columns.forEach((column, i) => column.once || fill(row.children[i], column, item));
      row.className = options.rowClass?.(item) ?? "";
      if (body.children[position] !== row) body.insertBefore(row, body.children[position] ?? null);
      position += 1;
    }
    for (const [key, row] of rows) {
      if (!seen.has(key)) {
        row.remove();
        rows.delete(key);
      }
    }
    const placeholder = $("tr.placeholder", body);
    if (items.length === 0 && !placeholder) {
      body.append(h("tr", { class: "placeholder" }, h("td", { colspan: columns.length }, options.empty)));
    } else if (items.length > 0 && placeholder) {
      placeholder.remove();
    }
  }

  return { el: h("div", { class: "table-wrap" }, table), update, rows };
}
