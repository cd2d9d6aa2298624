// Schedules: next and last run, the active scheduler, pause and resume.

import { h, when, timeCell, panel, api, post, actionButton, perform, dataTable } from "./ui.js";

export function schedulesView(main) {
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
        value: (s) =>
          s.paused === null || s.paused === undefined ? "unknown" : s.paused ? "paused" : "active",
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
    if (active)
      who.textContent = `Active scheduler: ${active.host} pid ${active.pid} since ${when(active.since)}`;
    else if (data.last_active)
      who.textContent = `No scheduler is active (last active: ${data.last_active.host} pid ${data.last_active.pid}); state read off the broker.`;
    else if (data.source === "unknown")
      who.textContent = "A scheduler holds the queue but did not answer: state unknown.";
    else
      who.textContent = (data.schedules ?? []).length
        ? "No scheduler is active; state read off the broker."
        : "";
    table.update(data.schedules ?? []);
  }
  return { refresh, poll: true };
}
