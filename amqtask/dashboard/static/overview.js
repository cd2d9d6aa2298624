// Overview: per task counts, live rate charts, the broker and cluster panel.

import { app, h, count, rate, latest, link, hashFor, panel, empty, api, dataTable } from "./ui.js";
import { RateChart, busiest } from "./charts.js";

const MAX_LINES = 8; // tasks drawn in the charts: the busiest, with hundreds of tasks
const RESELECT = 15; // polls between two choices of the busiest (lines do not come and go each poll)

export function overviewView(main) {
  const cards = h("div", { class: "cards", testid: "summary" });
  const warnings = h("div", { class: "warnings", testid: "warnings" });
  const chartBox = h("div", { class: "charts", testid: "rates-chart" });
  const inBox = h("div", { class: "chart" });
  const outBox = h("div", { class: "chart" });
  const chartNote = h("p", { class: "note" });
  chartBox.append(inBox, outBox);
  const charts = [new RateChart(inBox, "In (msg/s)"), new RateChart(outBox, "Out (msg/s)")];
  let drawn = null;
  let polls = 0;
  const nodes = h("div", { class: "cluster", testid: "cluster" });
  const notes = h("div", { class: "notes" });

  const table = dataTable(
    [
      {
        title: "Task",
        value: (t) => h("span", {}, t.task, h("span", { class: "version" }, ` v${t.version}`)),
      },
      { title: "Queue", value: (t) => h("span", {}, t.queue, h("span", { class: "tag" }, t.queue_type)) },
      {
        title: "Ready",
        testid: "ready",
        num: true,
        value: (t) => (t.exists ? count(t.ready) : "missing"),
        className: (t) => (t.exists ? "" : "bad"),
      },
      { title: "Due", testid: "due", num: true, value: (t) => count(t.due) },
      { title: "Unacked", testid: "unacked", num: true, value: (t) => count(t.unacked) },
      {
        title: "Consumers",
        testid: "consumers",
        num: true,
        value: (t) => count(t.consumers),
        className: (t) => (t.consumers === 0 && t.ready > 0 ? "warn" : ""),
      },
      {
        title: "Dead letters",
        testid: "dead-letters",
        num: true,
        value: (t) =>
          t.dead_letters
            ? link(hashFor("dead-letters", t.task), count(t.dead_letters))
            : count(t.dead_letters),
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
    panel("Rates, last 10 minutes", chartBox, chartNote),
    panel("Tasks", table.el, notes),
    panel("Broker and cluster", nodes),
  );

  function card(label, value, testid, bad = false) {
    return h(
      "div",
      { class: `card${bad ? " bad" : ""}`, testid },
      h("div", { class: "label" }, label),
      h("div", { class: "value" }, value),
    );
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
      h(
        "dd",
        {},
        String(data.source ?? "").includes("management")
          ? "AMQP and the management API"
          : "AMQP only (passive declares)",
      ),
      h("dt", {}, "Delayed"),
      h(
        "dd",
        { testid: "delayed" },
        `${count(data.delayed?.messages)} in ${data.delayed?.levels ?? "?"} delay levels`,
      ),
      h("dt", {}, "Leaders"),
      h(
        "dd",
        { class: cluster.balanced === false ? "warn-text" : null, testid: "balanced" },
        cluster.balanced === null || cluster.balanced === undefined
          ? "–"
          : cluster.balanced
            ? "balanced"
            : "unbalanced: some nodes lead far more queues than others",
      ),
    );
    const parts = [facts];
    if (!cluster.available) {
      parts.push(empty("Nodes and queue leaders need the management API (--management-url)."));
    } else {
      const nodeTable = dataTable(
        [
          { title: "Node", value: (n) => n.name },
          {
            title: "State",
            value: (n) => (n.running ? "running" : "down"),
            className: (n) => (n.running ? "good" : "bad"),
          },
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
      const all = Object.keys(rates.tasks ?? {}).length;
      if (drawn === null || polls % RESELECT === 0 || drawn.some((name) => !rates.tasks?.[name])) {
        drawn = busiest(rates, MAX_LINES);
      }
      polls += 1;
      charts[0].update(rates, "in", drawn);
      charts[1].update(rates, "out", drawn);
      const known = Object.values(rates.tasks ?? {}).some((r) => r.in?.some((v) => v !== null));
      chartNote.textContent = !known
        ? "In and out rates come from the management API (--management-url); none yet."
        : all > drawn.length
          ? `The ${drawn.length} busiest of ${all} tasks in the last 10 minutes.`
          : "";
    }
  }

  return { refresh, poll: true, destroy: () => charts.forEach((c) => c.destroy()) };
}
