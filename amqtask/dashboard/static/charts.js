// Live rate charts, drawn by uPlot (vendor/uPlot.iife.min.js, loaded before the modules).

import { rate, when } from "./ui.js";

const PALETTE = [
  "#2f6fde",
  "#e8743b",
  "#19a979",
  "#a35ec4",
  "#d64a6d",
  "#13a4b4",
  "#b08b12",
  "#5b6b7f",
  "#7a9a2a",
  "#c25b2a",
];

/** The `limit` tasks with the most traffic in the window (all of them when there are few), by name. */
export function busiest(rates, limit) {
  const names = Object.keys(rates.tasks ?? {});
  if (names.length <= limit) return names.sort();
  const total = (name) =>
    [...(rates.tasks[name].in ?? []), ...(rates.tasks[name].out ?? [])].reduce((sum, v) => sum + (v ?? 0), 0);
  const traffic = new Map(names.map((name) => [name, total(name)]));
  return names
    .sort((a, b) => traffic.get(b) - traffic.get(a) || a.localeCompare(b))
    .slice(0, limit)
    .sort();
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** A uPlot line chart of one rate (in or out) per task, sized to its container. */
export class RateChart {
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

  /** Draw `direction` ("in" or "out") of the tasks `names` (one line each, same colours in both). */
  update(rates, direction, names) {
    const data = [rates.t ?? [], ...names.map((name) => rates.tasks[name][direction] ?? [])];
    if (this.plot && this.tasks === names.join("\n")) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    this.tasks = names.join("\n");
    const axis = {
      stroke: cssVar("--muted"),
      grid: { stroke: cssVar("--grid"), width: 1 },
      ticks: { show: false },
    };
    const clock = (u, ticks) => ticks.map((t) => when(new Date(t * 1000).toISOString()));
    this.plot = new uPlot(
      {
        ...this.size(),
        title: this.title,
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
        axes: [
          { ...axis, space: 70, size: 32, values: clock },
          {
            ...axis,
            size: 44,
            values: (u, ticks) => ticks.map((v) => (Number.isInteger(v) ? String(v) : v.toFixed(1))),
          },
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
