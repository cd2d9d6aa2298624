// amqtask dashboard: one page, hash routes (#/overview, #/dead-letters/<task>, ...), and the
// JSON API under api/ polled every 2 s. No build step: this file is served as it is.
//
// Everything the broker hands us (task names, message bodies, headers, errors, tracebacks) is
// hostile. It reaches the page only as text: h() appends strings as text nodes and cells are set
// with textContent. Nothing here assigns innerHTML.

const POLL_MS = 2000;
const PAGE = 50;
const STATES = ["queued", "scheduled", "running", "retrying", "succeeded", "failed", "revoked"];
const PALETTE = [
  "#2f6fde", "#e8743b", "#19a979", "#a35ec4", "#d64a6d",
  "#13a4b4", "#b08b12", "#5b6b7f", "#7a9a2a", "#c25b2a",
];

const app = { config: null, generation: 0, view: null, overview: null };

// --- DOM and formatting helpers ----------------------------------------------------------------

/** An element with properties and children; strings become text nodes, never markup. */
function h(tag, props = {}, ...children) {
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

const $ = (selector, root = document) => root.querySelector(selector);
const numberFormat = new Intl.NumberFormat("en-US");

/** A count; null means the source could not tell (AMQP has no unacked count): "?". */
function count(value) {
  if (value === null || value === undefined) return "?";
  // A header another program wrote may hold anything: shown as it is, not as NaN.
  return typeof value === "number" ? numberFormat.format(value) : String(value);
}

function rate(value) {
  return value === null || value === undefined ? "–" : value.toFixed(1);
}

/** The last value of a series, or null. */
function latest(values) {
  return values?.length ? values[values.length - 1] : null;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** An ISO time as local time: "16:05:03" today, "2026-11-26 16:05" before. */
function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  const now = new Date();
  const time = `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
  if (t.toDateString() === now.toDateString()) return time;
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${time.slice(0, 5)}`;
}

function timeCell(iso) {
  return h("time", { datetime: iso ?? "", title: iso ?? "" }, when(iso));
}

function clip(text, limit = 120) {
  if (text === null || text === undefined) return "";
  const line = String(text).replace(/\s+/g, " ").trim();
  return line.length > limit ? `${line.slice(0, limit - 1)}…` : line;
}

function link(href, text, props = {}) {
  return h("a", { href, ...props }, text);
}

function hashFor(...parts) {
  return `#/${parts.map(encodeURIComponent).join("/")}`;
}

function panel(title, ...children) {
  return h("section", { class: "panel" }, title ? h("h2", {}, title) : null, ...children);
}

function empty(text) {
  return h("p", { class: "empty" }, text);
}

// --- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
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
function post(path, body = {}) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Amqtask-Action": "1" },
    body: JSON.stringify(body),
  });
}

// --- confirmations, notices, write buttons -------------------------------------------------------

/** Ask before a write; resolves true only when the user pressed Confirm. */
function confirmAction(title, text, label = "Confirm") {
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

function notify(text, kind = "ok") {
  const note = h("div", { class: `toast ${kind}`, testid: "toast", role: "status" }, text);
  document.body.append(note);
  setTimeout(() => note.remove(), kind === "error" ? 8000 : 4000);
}

/** A button for a write action: disabled, with a reason, in read-only mode. */
function actionButton(label, testid, onclick, extra = "") {
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

/** Confirm, run the write, say what it did (or why not), then refresh the view. */
async function perform({ title, text, label, run, done }) {
  if (!(await confirmAction(title, text, label))) return;
  try {
    const result = await run();
    notify(done(result));
  } catch (error) {
    notify(`${title} failed: ${error.message}`, "error");
  }
  await app.view?.refresh?.();
}

function plural(n, word) {
  return `${numberFormat.format(n)} ${word}${n === 1 ? "" : "s"}`;
}

// --- tables that update in place (a poll never swaps the element under the pointer) -------------

/**
 * columns: [{title, testid?, num?, value(item) -> string | Node, className?(item), once?}]
 * (`once`: built when the row appears and kept, for checkboxes and buttons).
 * options: {key(item), rowTestid?(item), rowClass?(item), empty}
 */
function dataTable(columns, options) {
  const body = h("tbody");
  const table = h(
    "table",
    { class: "data" },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
    body,
  );
  const rows = new Map();

  function fill(cell, column, item) {
    const value = column.value(item);
    if (value instanceof Node) {
      // Same look as before: keep the element (a click may be under way on it).
      if (cell.childNodes.length !== 1 || !cell.firstChild.isEqualNode(value)) cell.replaceChildren(value);
    }
    else if (cell.textContent !== String(value ?? "")) cell.textContent = String(value ?? "");
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

// --- live charts (uPlot) -------------------------------------------------------------------------

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** A uPlot line chart of one rate (in or out) per task, sized to its container. */
class RateChart {
  constructor(container, title) {
    this.container = container;
    this.title = title;
    this.plot = null;
    this.tasks = "";
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(container);
  }

  size() {
    return { width: Math.max(200, this.container.clientWidth), height: 190 };
  }

  update(rates, direction) {
    const names = Object.keys(rates.tasks ?? {}).sort();
    const data = [rates.t ?? [], ...names.map((name) => rates.tasks[name][direction] ?? [])];
    if (this.plot && this.tasks === names.join("\n")) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    this.tasks = names.join("\n");
    const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--grid"), width: 1 }, ticks: { show: false } };
    const clock = (u, ticks) => ticks.map((t) => when(new Date(t * 1000).toISOString()));
    this.plot = new uPlot(
      {
        ...this.size(),
        title: this.title,
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
        axes: [
          { ...axis, space: 70, size: 32, values: clock },
          { ...axis, size: 44, values: (u, ticks) => ticks.map((v) => (Number.isInteger(v) ? String(v) : v.toFixed(1))) },
        ],
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
        series: [
          {},
          ...names.map((name, i) => ({
            label: name,
            stroke: PALETTE[i % PALETTE.length],
            width: 1.5,
            points: { show: false },
            value: (u, v) => (v === null || v === undefined ? "–" : `${rate(v)}/s`),
          })),
        ],
      },
      data,
      this.container,
    );
  }

  destroy() {
    this.resize.disconnect();
    this.plot?.destroy();
  }
}

// --- Overview ------------------------------------------------------------------------------------

function overviewView(main) {
  const cards = h("div", { class: "cards", testid: "summary" });
  const warnings = h("div", { class: "warnings", testid: "warnings" });
  const chartBox = h("div", { class: "charts", testid: "rates-chart" });
  const inBox = h("div", { class: "chart" });
  const outBox = h("div", { class: "chart" });
  const chartNote = h("p", { class: "note" });
  chartBox.append(inBox, outBox);
  const charts = [new RateChart(inBox, "In (msg/s)"), new RateChart(outBox, "Out (msg/s)")];
  const nodes = h("div", { class: "cluster", testid: "cluster" });
  const notes = h("div", { class: "notes" });

  const table = dataTable(
    [
      { title: "Task", value: (t) => h("span", {}, t.task, h("span", { class: "version" }, ` v${t.version}`)) },
      { title: "Queue", value: (t) => h("span", {}, t.queue, h("span", { class: "tag" }, t.queue_type)) },
      { title: "Ready", testid: "ready", num: true, value: (t) => (t.exists ? count(t.ready) : "missing"), className: (t) => (t.exists ? "" : "bad") },
      { title: "Due", testid: "due", num: true, value: (t) => count(t.due) },
      { title: "Unacked", testid: "unacked", num: true, value: (t) => count(t.unacked) },
      { title: "Consumers", testid: "consumers", num: true, value: (t) => count(t.consumers), className: (t) => (t.consumers === 0 && t.ready > 0 ? "warn" : "") },
      {
        title: "Dead letters",
        testid: "dead-letters",
        num: true,
        value: (t) => (t.dead_letters ? link(hashFor("dead-letters", t.task), count(t.dead_letters)) : count(t.dead_letters)),
        className: (t) => (t.dead_letters > 0 ? "bad" : ""),
      },
      { title: "In/s", testid: "rate-in", num: true, value: (t) => rate(t.rate_in) },
      { title: "Out/s", testid: "rate-out", num: true, value: (t) => rate(t.rate_out) },
      { title: "Leader", value: (t) => t.leader ?? "–" },
      {
        title: "Online",
        testid: "online",
        num: true,
        value: (t) => (t.members ? `${t.members_online}/${t.members}` : "–"),
        className: (t) => (t.members && t.members_online * 2 <= t.members ? "bad" : ""),
      },
    ],
    {
      key: (t) => `${t.task}\n${t.version}`,
      rowTestid: (t) => `task-row-${t.task}`,
      rowClass: (t) => (t.lost_quorum ? "lost" : ""),
      empty: "This app has no contracts.",
    },
  );

  main.append(
    cards,
    warnings,
    panel("Rates, last minutes", chartBox, chartNote),
    panel("Tasks", table.el, notes),
    panel("Broker and cluster", nodes),
  );

  function card(label, value, testid, bad = false) {
    return h("div", { class: `card${bad ? " bad" : ""}`, testid }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
  }

  function sum(tasks, field) {
    if (tasks.some((t) => t.exists && (t[field] === null || t[field] === undefined))) return null;
    return tasks.reduce((total, t) => total + (t[field] ?? 0), 0);
  }

  function renderCluster(data) {
    const cluster = data.cluster ?? { available: false, nodes: [] };
    const lost = data.no_quorum ?? [];
    const facts = h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Broker"),
      h("dd", {}, app.config?.broker ?? "–"),
      h("dt", {}, "Counts from"),
      h("dd", {}, String(data.source ?? "").includes("management") ? "AMQP and the management API" : "AMQP only (passive declares)"),
      h("dt", {}, "Delayed"),
      h("dd", { testid: "delayed" }, `${count(data.delayed?.messages)} in ${data.delayed?.levels ?? "?"} delay levels`),
      h("dt", {}, "Leaders"),
      h("dd", {}, cluster.balanced === null || cluster.balanced === undefined ? "–" : cluster.balanced ? "balanced" : "unbalanced"),
    );
    const parts = [facts];
    if (!cluster.available) {
      parts.push(empty("Nodes and queue leaders need the management API (--management-url)."));
    } else {
      const nodeTable = dataTable(
        [
          { title: "Node", value: (n) => n.name },
          { title: "State", value: (n) => (n.running ? "running" : "down"), className: (n) => (n.running ? "good" : "bad") },
          { title: "Queue leaders", num: true, value: (n) => count(n.leaders) },
        ],
        { key: (n) => n.name, rowTestid: (n) => `node-${n.name}`, empty: "No nodes reported." },
      );
      nodeTable.update(cluster.nodes ?? []);
      parts.push(nodeTable.el);
    }
    if (lost.length) {
      parts.push(
        h(
          "div",
          { class: "banner error", testid: "no-quorum" },
          h("strong", {}, "Queues without quorum (they take and deliver nothing): "),
          lost.map((q, i) => [i ? ", " : "", `${q.queue} (${q.members_online}/${q.members} online)`]),
        ),
      );
    }
    nodes.replaceChildren(...parts);
  }

  async function refresh() {
    const [data, rates] = await Promise.all([api("overview"), api("rates").catch(() => null)]);
    app.overview = data;
    const tasks = data.tasks ?? [];
    const lostQueues = new Set((data.no_quorum ?? []).map((q) => q.queue));
    for (const t of tasks) {
      t.lost_quorum = lostQueues.has(t.queue);
      // The charts' latest point (the broker's smoothed rates where it has them), so the table
      // and the charts agree; else the change between the last two samples.
      const series = rates?.tasks?.[t.task];
      t.rate_in = latest(series?.in) ?? t.rates?.in;
      t.rate_out = latest(series?.out) ?? t.rates?.out;
    }
    const dead = sum(tasks, "dead_letters");
    cards.replaceChildren(
      card("Tasks", count(tasks.length), "total-tasks"),
      card("Ready", count(sum(tasks, "ready")), "total-ready"),
      card("Unacked", count(sum(tasks, "unacked")), "total-unacked"),
      card("Consumers", count(sum(tasks, "consumers")), "total-consumers"),
      card("Dead letters", count(dead), "total-dead-letters", dead > 0),
      card("Delayed", count(data.delayed?.messages), "total-delayed"),
    );
    const lines = [...(data.error ? [data.error] : []), ...(data.warnings ?? [])];
    warnings.replaceChildren(...lines.map((line) => h("div", { class: "banner error" }, line)));
    table.update(tasks);
    notes.replaceChildren(...(data.notes ?? []).map((line) => h("p", { class: "note" }, line)));
    renderCluster(data);
    if (rates) {
      charts[0].update(rates, "in");
      charts[1].update(rates, "out");
      const known = Object.values(rates.tasks ?? {}).some((r) => r.in?.some((v) => v !== null));
      chartNote.textContent = known ? "" : "In and out rates come from the management API (--management-url); none yet.";
    }
  }

  return { refresh, poll: true, destroy: () => charts.forEach((c) => c.destroy()) };
}

// --- Dead letters --------------------------------------------------------------------------------

function deadLetterQueuesView(main) {
  const table = dataTable(
    [
      { title: "Task", value: (q) => link(hashFor("dead-letters", q.task), q.task) },
      { title: "Dead-letter queue", value: (q) => q.dead_letter_queue },
      { title: "Messages", testid: "count", num: true, value: (q) => count(q.count), className: (q) => (q.count > 0 ? "bad" : "") },
    ],
    { key: (q) => q.task, rowTestid: (q) => `dlq-${q.task}`, empty: "No tasks." },
  );
  main.append(panel("Dead-letter queues", table.el));
  return {
    poll: true,
    refresh: async () => table.update((await api("dead-letters")).queues ?? []),
  };
}

function deadLettersView(main, task) {
  let offset = 0;
  let page = { letters: [], count: 0 };
  const selected = new Set();
  const base = `dead-letters/${encodeURIComponent(task)}`;
  const heading = h("h2", {}, "Dead letters of ", h("code", {}, task));
  const total = h("span", { class: "muted", testid: "dead-letter-total" });
  const pager = h("div", { class: "pager" });

  const selectAll = h("input", {
    type: "checkbox",
    "aria-label": "select all on this page",
    testid: "select-page",
    onchange: () => {
      for (const letter of page.letters) {
        if (letter.message_id) selectAll.checked ? selected.add(letter.message_id) : selected.delete(letter.message_id);
      }
      for (const box of table.el.querySelectorAll("tbody input[type=checkbox]")) box.checked = selectAll.checked;
      syncButtons();
    },
  });

  const table = dataTable(
    [
      {
        title: "",
        once: true,
        value: (d) =>
          h("input", {
            type: "checkbox",
            "aria-label": `select ${d.message_id}`,
            testid: "select",
            disabled: !d.message_id,
            checked: selected.has(d.message_id),
            onchange: (event) => {
              event.target.checked ? selected.add(d.message_id) : selected.delete(d.message_id);
              syncButtons();
            },
          }),
      },
      { title: "Message id", value: (d) => (d.message_id ? link(hashFor("dead-letters", task, d.message_id), d.message_id, { class: "mono" }) : "(none)") },
      { title: "Reason", value: (d) => d.reason ?? "–" },
      { title: "Attempts", num: true, value: (d) => count(d.attempts) },
      { title: "First failure", value: (d) => timeCell(d.first_failed_at) },
      { title: "Last failure", value: (d) => timeCell(d.failed_at) },
      { title: "Error", value: (d) => h("span", { class: "error-text", title: d.error ?? "" }, clip(d.error, 200)), className: () => "clipped" },
      {
        title: "",
        once: true,
        value: (d) =>
          h(
            "span",
            { class: "row-actions" },
            actionButton("Replay", "replay", () => replay([d.message_id]), "small"),
            actionButton("Purge", "purge", () => purge([d.message_id]), "small danger"),
          ),
      },
    ],
    {
      key: (d) => d.message_id ?? JSON.stringify(d),
      rowTestid: (d) => `letter-${d.message_id}`,
      empty: "No dead letters.",
    },
  );
  $("thead th", table.el).replaceChildren(selectAll);

  const buttons = {
    replaySelected: actionButton("Replay selected", "replay-selected", () => replay([...selected])),
    purgeSelected: actionButton("Purge selected", "purge-selected", () => purge([...selected]), "danger"),
    replayAll: actionButton("Replay all", "replay-all", () => replay(null)),
    purgeAll: actionButton("Purge all", "purge-all", () => purge(null), "danger"),
  };

  function syncButtons() {
    const readOnly = Boolean(app.config?.read_only);
    buttons.replaySelected.disabled = readOnly || selected.size === 0;
    buttons.purgeSelected.disabled = readOnly || selected.size === 0;
    buttons.replayAll.disabled = readOnly || !page.count;
    buttons.purgeAll.disabled = readOnly || !page.count;
    buttons.replaySelected.textContent = selected.size ? `Replay ${selected.size} selected` : "Replay selected";
    buttons.purgeSelected.textContent = selected.size ? `Purge ${selected.size} selected` : "Purge selected";
  }

  function what(ids) {
    if (ids === null) return `all ${plural(page.count ?? 0, "dead letter")} of ${task}`;
    return ids.length === 1 ? `dead letter ${ids[0]}` : plural(ids.length, "dead letter");
  }

  function replay(ids) {
    return perform({
      title: "Replay",
      text: `Send ${what(ids)} back to the work queue of ${task}? Each is removed from the dead-letter queue once the broker confirms the copy.`,
      label: "Replay",
      run: () => post(`${base}/replay`, ids === null ? { all: true } : { ids }),
      done: (r) => {
        ids?.forEach((id) => selected.delete(id));
        if (ids === null) selected.clear();
        return `Replayed ${plural(r.replayed, "message")}.`;
      },
    });
  }

  function purge(ids) {
    return perform({
      title: "Purge",
      text: `Delete ${what(ids)}? This cannot be undone.`,
      label: "Purge",
      run: () => post(`${base}/purge`, ids === null ? { all: true } : { ids }),
      done: (r) => {
        ids?.forEach((id) => selected.delete(id));
        if (ids === null) selected.clear();
        return `Purged ${plural(r.purged, "message")}.`;
      },
    });
  }

  function renderPager() {
    const shown = page.letters.length;
    const last = offset + shown;
    pager.replaceChildren(
      h("button", { class: "button small", type: "button", disabled: offset === 0, onclick: () => go(offset - PAGE) }, "‹ Newer"),
      h("span", { class: "muted" }, shown ? `${offset + 1}–${last} of ${count(page.count)}` : ""),
      h("button", { class: "button small", type: "button", disabled: page.count === null ? shown < PAGE : last >= page.count, onclick: () => go(offset + PAGE) }, "Older ›"),
    );
  }

  async function go(next) {
    offset = Math.max(0, next);
    await refresh();
  }

  async function refresh() {
    page = await api(`${base}?offset=${offset}&limit=${PAGE}`);
    const letters = page.letters ?? [];
    table.update(letters);
    const ids = new Set(letters.map((d) => d.message_id));
    for (const [key, row] of table.rows) {
      const box = $("input[type=checkbox]", row);
      if (box) box.checked = selected.has(key);
    }
    for (const id of [...selected]) if (!ids.has(id)) selected.delete(id);
    selectAll.checked = letters.length > 0 && letters.every((d) => selected.has(d.message_id));
    total.textContent = `${count(page.count)} in ${page.dead_letter_queue ?? "the dead-letter queue"}`;
    renderPager();
    syncButtons();
  }

  main.append(
    h("p", { class: "crumbs" }, link("#/dead-letters", "Dead letters"), " / ", task),
    h(
      "section",
      { class: "panel" },
      h("div", { class: "panel-head" }, heading, total),
      h("div", { class: "toolbar" }, Object.values(buttons)),
      table.el,
      pager,
    ),
  );
  syncButtons();
  return { refresh, poll: true };
}

function headersTable(headers) {
  const entries = Object.entries(headers ?? {});
  if (!entries.length) return empty("No headers.");
  return h(
    "div",
    { class: "table-wrap" },
    h("table", { class: "data kv" }, h("tbody", {}, entries.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, typeof v === "string" ? v : JSON.stringify(v)))))),
  );
}

function deadLetterView(main, task, id) {
  const base = `dead-letters/${encodeURIComponent(task)}`;
  const body = h("div", { testid: "letter-detail" });
  main.append(
    h("p", { class: "crumbs" }, link("#/dead-letters", "Dead letters"), " / ", link(hashFor("dead-letters", task), task), " / ", h("span", { class: "mono" }, id)),
    body,
  );

  async function act(kind) {
    const replaying = kind === "replay";
    await perform({
      title: replaying ? "Replay" : "Purge",
      text: replaying ? `Send dead letter ${id} back to the work queue of ${task}?` : `Delete dead letter ${id}? This cannot be undone.`,
      label: replaying ? "Replay" : "Purge",
      run: () => post(`${base}/${kind}`, { ids: [id] }),
      done: (r) => (replaying ? `Replayed ${plural(r.replayed, "message")}.` : `Purged ${plural(r.purged, "message")}.`),
    });
    location.hash = hashFor("dead-letters", task);
  }

  async function refresh() {
    let letter;
    try {
      letter = (await api(`${base}/${encodeURIComponent(id)}`)).letter;
    } catch (error) {
      if (error.status !== 404) throw error;
      body.replaceChildren(panel(null, empty("This dead letter is no longer in the queue (replayed, purged or expired).")));
      return;
    }
    const size = `${count(letter.body_size)} bytes${letter.body_truncated ? ", preview truncated" : ""}`;
    body.replaceChildren(
      h(
        "section",
        { class: "panel" },
        h("div", { class: "panel-head" }, h("h2", {}, "Dead letter ", h("code", {}, id)), h("div", { class: "toolbar" }, actionButton("Replay", "replay", () => act("replay")), actionButton("Purge", "purge", () => act("purge"), "danger"))),
        h(
          "dl",
          { class: "facts" },
          [
            ["Task", letter.task],
            ["Reason", letter.reason],
            ["Attempts", count(letter.attempts)],
            ["First failure", letter.first_failed_at],
            ["Last failure", letter.failed_at],
            ["Error type", letter.error_type],
            ["Error", letter.error],
            ["Content type", [letter.content_type, letter.content_encoding].filter(Boolean).join("; ")],
          ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v || "–")]),
        ),
      ),
      panel("Traceback", letter.traceback ? h("pre", { class: "code", testid: "traceback" }, letter.traceback) : empty("No traceback.")),
      panel(`Body (${size})`, h("pre", { class: "code", testid: "body" }, letter.body ?? "")),
      panel("Headers", headersTable(letter.headers)),
    );
  }

  return { refresh, poll: false };
}

// --- Schedules -----------------------------------------------------------------------------------

function schedulesView(main) {
  const who = h("p", { class: "muted", testid: "active-scheduler" });

  function toggle(s) {
    const pausing = !s.paused;
    return perform({
      title: pausing ? "Pause schedule" : "Resume schedule",
      text: pausing
        ? `Pause ${s.name}? Ticks that fall due while it is paused never fire.`
        : `Resume ${s.name}? It fires again from its next due time.`,
      label: pausing ? "Pause" : "Resume",
      run: () => post(`schedules/${encodeURIComponent(s.name)}/${pausing ? "pause" : "resume"}`),
      done: (r) => `${r.name ?? s.name} is ${r.paused ? "paused" : "active"}.`,
    });
  }

  const table = dataTable(
    [
      { title: "Name", value: (s) => s.name },
      { title: "Task", value: (s) => `${s.task} v${s.version}` },
      { title: "Schedule", value: (s) => h("code", {}, s.schedule ?? "–") },
      { title: "TZ", value: (s) => s.tz ?? "–" },
      { title: "Next due", testid: "next", value: (s) => (s.paused ? "–" : timeCell(s.next_due)) },
      { title: "Last fired", testid: "last", value: (s) => timeCell(s.last_fired) },
      {
        title: "State",
        testid: "state",
        value: (s) => (s.paused === null || s.paused === undefined ? "unknown" : s.paused ? "paused" : "active"),
        className: (s) => (s.paused ? "warn" : s.paused === false ? "good" : ""),
      },
      {
        title: "",
        value: (s) =>
          s.paused === null || s.paused === undefined
            ? ""
            : s.paused
              ? actionButton("Resume", "resume", () => toggle(s), "small")
              : actionButton("Pause", "pause", () => toggle(s), "small"),
      },
    ],
    { key: (s) => s.name, rowTestid: (s) => `schedule-${s.name}`, empty: "This app has no schedules." },
  );
  main.append(panel("Schedules", who, table.el));

  async function refresh() {
    const data = await api("schedules");
    const active = data.active;
    if (active) who.textContent = `Active scheduler: ${active.host} pid ${active.pid} since ${when(active.since)}`;
    else if (data.last_active) who.textContent = `No scheduler is active (last active: ${data.last_active.host} pid ${data.last_active.pid}); state read off the broker.`;
    else if (data.source === "unknown") who.textContent = "A scheduler holds the queue but did not answer: state unknown.";
    else who.textContent = (data.schedules ?? []).length ? "No scheduler is active; state read off the broker." : "";
    table.update(data.schedules ?? []);
  }
  return { refresh, poll: true };
}

// --- Workers -------------------------------------------------------------------------------------

/** A work queue and its due queue read as one name: "images.resize (+ due)". */
function queueNames(queues) {
  const all = new Set(queues ?? []);
  return [...all]
    .filter((q) => !(q.endsWith(".due") && all.has(q.slice(0, -4))))
    .map((q) => (all.has(`${q}.due`) ? `${q} (+ due)` : q))
    .join(", ");
}

function workersView(main) {
  const note = h("p", { class: "note" });
  const table = dataTable(
    [
      {
        title: "Worker",
        value: (w) => h("span", { title: w.name }, w.amqtask_worker ? `${w.host} pid ${w.pid}` : w.name),
      },
      { title: "Queues", value: (w) => queueNames(w.queues), className: () => "wrap" },
      { title: "Since", value: (w) => timeCell(w.since) },
      { title: "Concurrency", num: true, value: (w) => count(w.concurrency) },
      { title: "Prefetch", num: true, value: (w) => count(w.prefetch) },
      { title: "In flight", testid: "in-flight", num: true, value: (w) => count(w.in_flight) },
      { title: "Succeeded", num: true, value: (w) => count(w.processed?.succeeded) },
      { title: "Failed", num: true, value: (w) => count(w.processed?.failed), className: (w) => (w.processed?.failed > 0 ? "warn" : "") },
      {
        title: "Pool",
        value: (w) =>
          [
            w.pool_type,
            ...Object.entries(w.pool ?? {}).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`),
          ]
            .filter(Boolean)
            .join(", ") || "–",
      },
    ],
    { key: (w) => `${w.name}\n${w.peer ?? ""}`, rowTestid: (w) => `worker-${w.pid ?? w.name}`, empty: "No worker consumes this app's queues." },
  );
  main.append(panel("Workers", table.el, note));
  async function refresh() {
    const data = await api("workers");
    table.update(data.workers ?? []);
    note.textContent =
      data.available === false
        ? "Workers are read from the management API, which cannot be reached (--management-url)."
        : data.inspected === false
          ? "The workers did not answer inspect: in flight and pool unknown."
          : "";
  }
  return { refresh, poll: true };
}

// --- Tasks (task store) ---------------------------------------------------------------------------

const stateClass = { succeeded: "good", failed: "bad", revoked: "warn", retrying: "warn", running: "info" };

function statePill(state) {
  return h("span", { class: `pill ${stateClass[state] ?? ""}`.trim() }, state ?? "–");
}

function tasksView(main) {
  const filter = { id: "", state: "", task: "", since: "" };
  const names = [...new Set((app.overview?.tasks ?? []).map((t) => t.task))];
  const field = (label, input) => h("label", { class: "field" }, h("span", {}, label), input);
  const idInput = h("input", { type: "search", placeholder: "task id", testid: "search-id", autocomplete: "off" });
  const stateInput = h("select", { testid: "search-state" }, h("option", { value: "" }, "any"), STATES.map((s) => h("option", { value: s }, s)));
  const taskInput = h("input", { type: "search", placeholder: "task name", list: "task-names", testid: "search-task" });
  const sinceInput = h("input", { type: "datetime-local", testid: "search-since" });
  const form = h(
    "form",
    {
      class: "search",
      onsubmit: (event) => {
        event.preventDefault();
        filter.id = idInput.value.trim();
        filter.state = stateInput.value;
        filter.task = taskInput.value.trim();
        filter.since = sinceInput.value ? new Date(sinceInput.value).toISOString() : "";
        refresh().catch((error) => notify(error.message, "error"));
      },
    },
    field("ID", idInput),
    field("State", stateInput),
    field("Task", taskInput),
    field("Since", sinceInput),
    h("datalist", { id: "task-names" }, names.map((n) => h("option", { value: n }))),
    h("button", { class: "button primary", type: "submit", testid: "search" }, "Search"),
  );
  const note = h("div");
  const table = dataTable(
    [
      { title: "ID", value: (t) => link(hashFor("tasks", t.id), t.id, { class: "mono" }) },
      { title: "Task", value: (t) => `${t.task} v${t.version}` },
      { title: "State", testid: "state", value: (t) => statePill(t.state) },
      { title: "Attempts", num: true, value: (t) => count(t.attempts) },
      { title: "Queued", value: (t) => timeCell(t.queued_at) },
      { title: "Started", value: (t) => timeCell(t.started_at) },
      { title: "Finished", value: (t) => timeCell(t.finished_at) },
      { title: "Worker", value: (t) => t.worker ?? "–" },
      { title: "Error", value: (t) => h("span", { class: "error-text", title: t.error ?? "" }, clip(t.error ?? t.reason, 200)), className: () => "clipped" },
    ],
    { key: (t) => t.id, rowTestid: (t) => `task-${t.id}`, empty: "No task matches." },
  );
  main.append(panel("Tasks", form, note, table.el));

  async function refresh() {
    const query = new URLSearchParams({ limit: "50" });
    for (const [k, v] of Object.entries(filter)) if (v) query.set(k, v);
    const data = await api(`tasks?${query}`);
    if (data.store === false) {
      note.replaceChildren(empty("No task store: give the App a store (App(..., store=\"sqlite:///tasks.db\" or \"postgresql://...\")) to search tasks here."));
      form.hidden = true;
      table.el.hidden = true;
      return;
    }
    note.replaceChildren();
    table.update(data.tasks ?? []);
  }
  return { refresh, poll: true };
}

function taskView(main, id) {
  const body = h("div", { testid: "task-detail" });
  main.append(h("p", { class: "crumbs" }, link("#/tasks", "Tasks"), " / ", h("span", { class: "mono" }, id)), body);
  let terminate = false;

  function revoke() {
    return perform({
      title: "Revoke",
      text: terminate ? `Revoke task ${id} and stop it if a worker runs it?` : `Revoke task ${id}? A worker acks it without running it.`,
      label: "Revoke",
      run: () => post(`tasks/${encodeURIComponent(id)}/revoke`, { terminate }),
      done: () => `Task ${id} revoked.`,
    });
  }

  let shown = "";
  async function refresh() {
    const data = await api(`tasks/${encodeURIComponent(id)}`);
    // Rebuilt only when something changed: the Revoke button stays put between polls.
    const signature = JSON.stringify(data);
    if (signature === shown) return;
    shown = signature;
    const t = data.task;
    const finished = ["succeeded", "failed", "revoked"].includes(t.state);
    const terminateBox = h("input", { type: "checkbox", checked: terminate, disabled: Boolean(app.config?.read_only), onchange: (e) => (terminate = e.target.checked) });
    const revokeButton = actionButton("Revoke", "revoke", revoke, "danger");
    if (finished) revokeButton.disabled = true;
    body.replaceChildren(...[
      h(
        "section",
        { class: "panel" },
        h(
          "div",
          { class: "panel-head" },
          h("h2", {}, `${t.task} v${t.version} `, statePill(t.state)),
          finished ? null : h("div", { class: "toolbar" }, h("label", { class: "check" }, terminateBox, "stop it if running"), revokeButton),
        ),
        h(
          "dl",
          { class: "facts" },
          [
            ["ID", t.id],
            ["Attempts", count(t.attempts)],
            ["Worker", t.worker],
            ["Queued", t.queued_at],
            ["Due", t.due_at],
            ["Started", t.started_at],
            ["Finished", t.finished_at],
            ["Reason", t.reason],
            ["Error", [t.error_type, t.error].filter(Boolean).join(": ")],
          ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v || "–")]),
        ),
      ),
      panel(
        "Timeline",
        h(
          "ol",
          { class: "timeline", testid: "timeline" },
          (data.timeline ?? []).map((e) => h("li", { class: stateClass[e.event] ?? "" }, h("span", { class: "event" }, e.event), " ", timeCell(e.at))),
        ),
      ),
      t.traceback ? panel("Traceback", h("pre", { class: "code" }, t.traceback)) : null,
      t.result !== undefined && t.result !== null ? panel("Result", h("pre", { class: "code" }, JSON.stringify(t.result, null, 2))) : null,
    ].filter(Boolean));
  }
  return { refresh, poll: true };
}

// --- Contracts -----------------------------------------------------------------------------------

function retryText(retry) {
  if (!retry) return "–";
  const { attempts, initial, backoff, max_delay: max, on } = retry;
  if (attempts <= 1) return "no retries (1 attempt)";
  const when = on?.length ? `; on ${on.join(", ")}` : "";
  return `${attempts} attempts, ${initial} s then ×${backoff} up to ${max} s${when}`;
}

function contractsView(main) {
  const list = h("div", { class: "contracts", testid: "contracts" });
  main.append(list);
  async function refresh() {
    const data = await api("contracts");
    const contracts = data.contracts ?? [];
    list.replaceChildren(
      ...(contracts.length ? [] : [panel(null, empty("This app has no contracts."))]),
      ...contracts.map((c) =>
        h(
          "section",
          { class: "panel", testid: `contract-${c.name}` },
          h("div", { class: "panel-head" }, h("h2", {}, c.name, h("span", { class: "version" }, ` v${c.version}`)), h("span", { class: "tag" }, c.calls === "transient" ? "transient calls" : "durable")),
          h(
            "dl",
            { class: "facts" },
            [
              ["Queue", `${c.queue} (${c.queue_type})`],
              ["Routing key", c.routing_key],
              ["Max length", c.max_length === null || c.max_length === undefined ? "unbounded" : `${count(c.max_length)} (${c.overflow})`],
              ["Delivery limit", c.delivery_limit ?? "–"],
              ["Retry", retryText(c.retry)],
            ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v ?? "–"))]),
          ),
          h("details", {}, h("summary", {}, "Input schema"), h("pre", { class: "code" }, JSON.stringify(c.input, null, 2))),
          h("details", {}, h("summary", {}, "Output schema"), h("pre", { class: "code" }, JSON.stringify(c.output, null, 2))),
        ),
      ),
    );
  }
  return { refresh, poll: false };
}

// --- routing and polling -------------------------------------------------------------------------

function resolve(parts) {
  const [tab, first, second] = parts;
  switch (tab) {
    case "dead-letters":
      if (second) return [tab, (main) => deadLetterView(main, first, second)];
      if (first) return [tab, (main) => deadLettersView(main, first)];
      return [tab, deadLetterQueuesView];
    case "schedules":
      return [tab, schedulesView];
    case "workers":
      return [tab, workersView];
    case "tasks":
      return [tab, first ? (main) => taskView(main, first) : tasksView];
    case "contracts":
      return [tab, contractsView];
    default:
      return ["overview", overviewView];
  }
}

function setLive(error) {
  const banner = $('[data-testid="error"]');
  const live = $('[data-testid="live"]');
  banner.hidden = !error;
  banner.textContent = error ? `Cannot load: ${error}` : "";
  live.classList.toggle("down", Boolean(error));
  $(".when", live).textContent = error ? "no connection" : `updated ${when(new Date().toISOString())}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function show() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const [tab, make] = resolve(parts);
  for (const a of document.querySelectorAll(".tabs a")) a.classList.toggle("active", a.dataset.tab === tab);
  app.view?.destroy?.();
  const main = $("#view");
  main.replaceChildren();
  const generation = ++app.generation;
  const view = make(main);
  app.view = view;
  // One request at a time per view: the next poll starts 2 s after the last answer.
  do {
    if (!document.hidden) {
      try {
        await view.refresh();
        if (generation !== app.generation) return;
        setLive(null);
      } catch (error) {
        if (generation !== app.generation) return;
        setLive(error.message);
      }
    }
    await sleep(POLL_MS);
  } while (view.poll && generation === app.generation);
}

async function start() {
  try {
    app.config = await api("config");
  } catch (error) {
    setLive(error.message);
    setTimeout(start, POLL_MS);
    return;
  }
  const c = app.config;
  document.title = `${c.app ?? c.namespace} · amqtask`;
  $('[data-testid="app-name"]').textContent = c.app ?? "";
  $('[data-testid="broker"]').textContent = `${c.broker} · ${c.namespace}`;
  $('[data-testid="read-only"]').hidden = !c.read_only;
  document.body.classList.toggle("read-only", Boolean(c.read_only));
  window.addEventListener("hashchange", show);
  show();
}

start();
