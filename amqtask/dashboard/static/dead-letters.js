// Dead letters: the queues, a paged table per task with replay and purge, one letter in full.

import {
  app,
  h,
  $,
  count,
  timeCell,
  clip,
  link,
  hashFor,
  panel,
  empty,
  facts,
  api,
  post,
  actionButton,
  perform,
  plural,
  dataTable,
} from "./ui.js";

const PAGE = 50; // dead letters per page
const RELOAD_MS = 30000; // a page shown is read again at least this often

// A row is a letter at a position in the queue: two copies with one message id are two rows,
// and an action names one copy by its id and digest.
const keyOf = (d) => `${d.position}:${d.digest}`;
const named = (d) => ({ id: d.message_id, digest: d.digest });

export function deadLetterQueuesView(main) {
  const table = dataTable(
    [
      { title: "Task", value: (q) => link(hashFor("dead-letters", q.task), q.task) },
      { title: "Dead-letter queue", value: (q) => q.dead_letter_queue },
      {
        title: "Messages",
        testid: "count",
        num: true,
        value: (q) => count(q.count),
        className: (q) => (q.count > 0 ? "bad" : ""),
      },
    ],
    { key: (q) => q.task, rowTestid: (q) => `dlq-${q.task}`, empty: "No tasks." },
  );
  main.append(panel("Dead-letter queues", table.el));
  return {
    poll: true,
    refresh: async () => table.update((await api("dead-letters")).queues ?? []),
  };
}

export function deadLettersView(main, task) {
  let offset = 0;
  let page = { letters: [], count: 0 };
  const selected = new Map(); // keyOf(letter) -> named(letter)
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
        if (letter.message_id)
          selectAll.checked ? selected.set(keyOf(letter), named(letter)) : selected.delete(keyOf(letter));
      }
      for (const box of table.el.querySelectorAll("tbody input[type=checkbox]"))
        box.checked = selectAll.checked;
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
            checked: selected.has(keyOf(d)),
            onchange: (event) => {
              event.target.checked ? selected.set(keyOf(d), named(d)) : selected.delete(keyOf(d));
              syncButtons();
            },
          }),
      },
      {
        title: "Message id",
        value: (d) =>
          d.message_id
            ? link(hashFor("dead-letters", task, d.message_id), d.message_id, { class: "mono" })
            : "(none)",
      },
      { title: "Reason", value: (d) => d.reason ?? "–" },
      { title: "Attempts", num: true, value: (d) => count(d.attempts) },
      { title: "First failure", value: (d) => timeCell(d.first_failed_at) },
      { title: "Last failure", value: (d) => timeCell(d.failed_at) },
      {
        title: "Error",
        value: (d) => h("span", { class: "error-text", title: d.error ?? "" }, clip(d.error, 200)),
        className: () => "clipped",
      },
      {
        title: "",
        once: true,
        value: (d) =>
          h(
            "span",
            { class: "row-actions" },
            actionButton("Replay", "replay", () => replay([named(d)]), "small"),
            actionButton("Purge", "purge", () => purge([named(d)]), "small danger"),
          ),
      },
    ],
    {
      key: keyOf,
      rowTestid: (d) => `letter-${d.message_id}`,
      empty: "No dead letters.",
    },
  );
  $("thead th", table.el).replaceChildren(selectAll);

  const buttons = {
    replaySelected: actionButton("Replay selected", "replay-selected", () => replay([...selected.values()])),
    purgeSelected: actionButton("Purge selected", "purge-selected", () => purge([...selected.values()]), "danger"),
    replayAll: actionButton("Replay all", "replay-all", () => replay(null)),
    purgeAll: actionButton("Purge all", "purge-all", () => purge(null), "danger"),
  };

  function syncButtons() {
    const readOnly = Boolean(app.config?.read_only);
    buttons.replaySelected.disabled = readOnly || selected.size === 0;
    buttons.purgeSelected.disabled = readOnly || selected.size === 0;
    buttons.replayAll.disabled = readOnly || !page.count;
    buttons.purgeAll.disabled = readOnly || !page.count;
    buttons.replaySelected.textContent = selected.size
      ? `Replay ${selected.size} selected`
      : "Replay selected";
    buttons.purgeSelected.textContent = selected.size ? `Purge ${selected.size} selected` : "Purge selected";
  }

  // `letters`: [{id, digest}] (one copy each), or null for all.
  function what(letters) {
    if (letters === null) return `all ${plural(page.count ?? 0, "dead letter")} of ${task}`;
    return letters.length === 1 ? `dead letter ${letters[0].id}` : plural(letters.length, "dead letter");
  }

  function replay(letters) {
    return perform({
      title: "Replay",
      text: `Send ${what(letters)} back to the work queue of ${task}? Each is removed from the dead-letter queue once the broker confirms the copy.`,
      label: "Replay",
      run: () => post(`${base}/replay`, letters === null ? { all: true } : { letters }),
      done: (r) => {
        stale = true;
        selected.clear(); // the positions shift
        return `Replayed ${plural(r.replayed, "message")}.`;
      },
    });
  }

  function purge(letters) {
    return perform({
      title: "Purge",
      text: `Delete ${what(letters)}? This cannot be undone.`,
      label: "Purge",
      // "All" is what the dialog said: the server refuses (409) if the queue holds more now.
      run: () =>
        post(`${base}/purge`, letters === null ? { all: true, count: page.count ?? 0 } : { letters }).catch(
          (error) => {
            stale = true; // read the queue again: the count shown was old
            throw error;
          },
        ),
      done: (r) => {
        stale = true;
        selected.clear(); // the positions shift
        return `Purged ${plural(r.purged, "message")}.`;
      },
    });
  }

  function renderPager() {
    const shown = page.letters.length;
    const last = offset + shown;
    pager.replaceChildren(
      h(
        "button",
        { class: "button small", type: "button", disabled: offset === 0, onclick: () => go(offset - PAGE) },
        "‹ Previous",
      ),
      h("span", { class: "muted" }, shown ? `${offset + 1}–${last} of ${count(page.count)}` : ""),
      h(
        "button",
        {
          class: "button small",
          type: "button",
          disabled: page.count === null ? shown < PAGE : last >= page.count,
          onclick: () => go(offset + PAGE),
        },
        "Next ›",
      ),
    );
  }

  async function go(next) {
    offset = Math.max(0, next);
    stale = true;
    await refresh();
  }

  // Reading a page takes the letters off the queue and puts them back (AMQP has no peek): each
  // read counts as a delivery. So the poll asks for the queue's count (from the status sample,
  // no broker round trip) and reads the page again only when it changed, after an action or a
  // page change, and at least every RELOAD_MS.
  let stale = true;
  let lastCount;
  let loadedAt = 0;

  async function refresh() {
    if (!stale) {
      const queues = (await api("dead-letters")).queues ?? [];
      const now = queues.find((q) => q.task === task)?.count;
      stale = now !== lastCount || Date.now() - loadedAt > RELOAD_MS;
    }
    if (!stale) return;
    page = await api(`${base}?offset=${offset}&limit=${PAGE}`);
    stale = false;
    lastCount = page.count;
    loadedAt = Date.now();
    const letters = page.letters ?? [];
    table.update(letters);
    const keys = new Set(letters.map(keyOf));
    for (const [key, row] of table.rows) {
      const box = $("input[type=checkbox]", row);
      if (box) box.checked = selected.has(key);
    }
    for (const key of [...selected.keys()]) if (!keys.has(key)) selected.delete(key);
    selectAll.checked = letters.length > 0 && letters.every((d) => selected.has(keyOf(d)));
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
    h(
      "table",
      { class: "data kv" },
      h(
        "tbody",
        {},
        entries.map(([k, v]) =>
          h(
            "tr",
            {},
            h("th", {}, k),
            h("td", { class: "mono" }, typeof v === "string" ? v : JSON.stringify(v)),
          ),
        ),
      ),
    ),
  );
}

export function deadLetterView(main, task, id) {
  const base = `dead-letters/${encodeURIComponent(task)}`;
  const body = h("div", { testid: "letter-detail" });
  let shown = null; // the letter on the page: its actions name this copy
  main.append(
    h(
      "p",
      { class: "crumbs" },
      link("#/dead-letters", "Dead letters"),
      " / ",
      link(hashFor("dead-letters", task), task),
      " / ",
      h("span", { class: "mono" }, id),
    ),
    body,
  );

  async function act(kind) {
    const replaying = kind === "replay";
    const ran = await perform({
      title: replaying ? "Replay" : "Purge",
      text: replaying
        ? `Send dead letter ${id} back to the work queue of ${task}?`
        : `Delete dead letter ${id}? This cannot be undone.`,
      label: replaying ? "Replay" : "Purge",
      run: () => post(`${base}/${kind}`, shown ? { letters: [named(shown)] } : { ids: [id] }),
      done: (r) =>
        replaying ? `Replayed ${plural(r.replayed, "message")}.` : `Purged ${plural(r.purged, "message")}.`,
    });
    if (ran) location.hash = hashFor("dead-letters", task);
  }

  async function refresh() {
    let letter;
    try {
      letter = (await api(`${base}/${encodeURIComponent(id)}`)).letter;
      shown = letter;
    } catch (error) {
      if (error.status !== 404) throw error;
      body.replaceChildren(
        panel(null, empty("This dead letter is no longer in the queue (replayed, purged or expired).")),
      );
      return;
    }
    const size = `${count(letter.body_size)} bytes${letter.body_truncated ? ", preview truncated" : ""}`;
    body.replaceChildren(
      h(
        "section",
        { class: "panel" },
        h(
          "div",
          { class: "panel-head" },
          h("h2", {}, "Dead letter ", h("code", {}, id)),
          h(
            "div",
            { class: "toolbar" },
            actionButton("Replay", "replay", () => act("replay")),
            actionButton("Purge", "purge", () => act("purge"), "danger"),
          ),
        ),
        facts([
          ["Task", letter.task],
          ["Reason", letter.reason],
          ["Attempts", count(letter.attempts)],
          ["First failure", letter.first_failed_at],
          ["Last failure", letter.failed_at],
          ["Error type", letter.error_type],
          ["Error", letter.error],
          ["Content type", [letter.content_type, letter.content_encoding].filter(Boolean).join("; ")],
        ]),
      ),
      panel(
        "Traceback",
        letter.traceback
          ? h("pre", { class: "code", testid: "traceback" }, letter.traceback)
          : empty("No traceback."),
      ),
      panel(`Body (${size})`, h("pre", { class: "code", testid: "body" }, letter.body ?? "")),
      panel("Headers", headersTable(letter.headers)),
    );
  }

  return { refresh, poll: false };
}
