// Tasks of the task store: search, a task's timeline, revoke.

import {
  app,
  h,
  count,
  when,
  timeCell,
  clip,
  link,
  hashFor,
  panel,
  empty,
  facts,
  api,
  post,
  notify,
  actionButton,
  perform,
  dataTable,
} from "./ui.js";

const STATES = ["queued", "scheduled", "running", "retrying", "succeeded", "failed", "revoked"];

const stateClass = {
  succeeded: "good",
  failed: "bad",
  revoked: "warn",
  retrying: "warn",
  running: "info",
};

function statePill(state) {
  return h("span", { class: `pill ${stateClass[state] ?? ""}`.trim() }, state ?? "–");
}

export function tasksView(main) {
  const filter = { id: "", state: "", task: "", since: "" };
  const names = [...new Set((app.overview?.tasks ?? []).map((t) => t.task))];
  const field = (label, input) => h("label", { class: "field" }, h("span", {}, label), input);
  const idInput = h("input", {
    type: "search",
    placeholder: "task id",
    testid: "search-id",
    autocomplete: "off",
  });
  const stateInput = h(
    "select",
    { testid: "search-state" },
    h("option", { value: "" }, "any"),
    STATES.map((s) => h("option", { value: s }, s)),
  );
  const taskInput = h("input", {
    type: "search",
    placeholder: "task name",
    list: "task-names",
    testid: "search-task",
  });
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
    h(
      "datalist",
      { id: "task-names" },
      names.map((n) => h("option", { value: n })),
    ),
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
      {
        title: "Error",
        value: (t) =>
          h("span", { class: "error-text", title: t.error ?? "" }, clip(t.error ?? t.reason, 200)),
        className: () => "clipped",
      },
    ],
    { key: (t) => t.id, rowTestid: (t) => `task-${t.id}`, empty: "No task matches." },
  );
  main.append(panel("Tasks", form, note, table.el));

  async function refresh() {
    const query = new URLSearchParams({ limit: "50" });
    for (const [k, v] of Object.entries(filter)) if (v) query.set(k, v);
    const data = await api(`tasks?${query}`);
    if (data.store === false) {
      note.replaceChildren(
        empty(
          'No task store: give the App a store (App(..., store="sqlite:///tasks.db" or "postgresql://...")) to search tasks here.',
        ),
      );
      form.hidden = true;
      table.el.hidden = true;
      return;
    }
    note.replaceChildren();
    table.update(data.tasks ?? []);
  }
  return { refresh, poll: true };
}

export function taskView(main, id) {
  const body = h("div", { testid: "task-detail" });
  main.append(
    h("p", { class: "crumbs" }, link("#/tasks", "Tasks"), " / ", h("span", { class: "mono" }, id)),
    body,
  );
  let terminate = false;

  function revoke() {
    return perform({
      title: "Revoke",
      text: terminate
        ? `Revoke task ${id} and stop it if a worker runs it?`
        : `Revoke task ${id}? A worker acks it without running it.`,
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
    const terminateBox = h("input", {
      type: "checkbox",
      checked: terminate,
      disabled: Boolean(app.config?.read_only),
      onchange: (e) => (terminate = e.target.checked),
    });
    const revokeButton = actionButton("Revoke", "revoke", revoke, "danger");
    if (finished) revokeButton.disabled = true;
    body.replaceChildren(
      ...[
        h(
          "section",
          { class: "panel" },
          h(
            "div",
            { class: "panel-head" },
            h("h2", {}, `${t.task} v${t.version} `, statePill(t.state)),
            finished
              ? null
              : h(
                  "div",
                  { class: "toolbar" },
                  h("label", { class: "check" }, terminateBox, "stop it if running"),
                  revokeButton,
                ),
          ),
          facts([
            ["ID", t.id],
            ["Attempts", count(t.attempts)],
            ["Worker", t.worker],
            ["Queued", t.queued_at],
            ["Due", t.due_at],
            ["Started", t.started_at],
            ["Finished", t.finished_at],
            ["Reason", t.reason],
            ["Error", [t.error_type, t.error].filter(Boolean).join(": ")],
          ]),
        ),
        panel(
          "Timeline",
          h(
            "ol",
            { class: "timeline", testid: "timeline" },
            (data.timeline ?? []).map((e) =>
              h(
                "li",
                { class: stateClass[e.event] ?? "" },
                h("span", { class: "event" }, e.event),
                " ",
                timeCell(e.at),
              ),
            ),
          ),
        ),
        t.traceback ? panel("Traceback", h("pre", { class: "code" }, t.traceback)) : null,
        t.result !== undefined && t.result !== null
          ? panel("Result", h("pre", { class: "code" }, JSON.stringify(t.result, null, 2)))
          : null,
      ].filter(Boolean),
    );
  }
  return { refresh, poll: true };
}
