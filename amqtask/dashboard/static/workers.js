// Workers: who consumes which queue, since when, how busy.

import { h, count, timeCell, panel, api, dataTable } from "./ui.js";

/** A work queue and its due queue read as one name: "images.resize (+ due)". */
function queueNames(queues) {
  const all = new Set(queues ?? []);
  return [...all]
    .filter((q) => !(q.endsWith(".due") && all.has(q.slice(0, -4))))
    .map((q) => (all.has(`${q}.due`) ? `${q} (+ due)` : q))
    .join(", ");
}

export function workersView(main) {
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
      {
        title: "Failed",
        num: true,
        value: (w) => count(w.processed?.failed),
        className: (w) => (w.processed?.failed > 0 ? "warn" : ""),
      },
      {
        title: "Pool",
        value: (w) =>
          [
            w.pool_type,
            ...Object.entries(w.pool ?? {}).map(
              ([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`,
            ),
          ]
            .filter(Boolean)
            .join(", ") || "–",
      },
    ],
    {
      key: (w) => `${w.name}\n${w.peer ?? ""}`,
      rowTestid: (w) => `worker-${w.pid ?? w.name}`,
      empty: "No worker consumes this app's queues.",
    },
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
