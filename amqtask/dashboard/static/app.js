// amqtask dashboard: one page, hash routes (#/overview, #/dead-letters/<task>, ...), and the
// JSON API under api/ polled every 2 s. No build step: these modules are served as they are.

import { app, $, when, api } from "./ui.js";
import { overviewView } from "./overview.js";
import { deadLetterQueuesView, deadLettersView, deadLetterView } from "./dead-letters.js";
import { schedulesView } from "./schedules.js";
import { workersView } from "./workers.js";
import { tasksView, taskView } from "./tasks.js";
import { contractsView } from "./contracts.js";

const POLL_MS = 2000;

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
  for (const a of document.querySelectorAll(".tabs a")) {
    a.classList.toggle("active", a.dataset.tab === tab);
    if (a.dataset.tab === tab) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  app.view?.destroy?.();
  const main = $("#view");
  main.replaceChildren();
  const generation = ++app.generation;
  const view = make(main);
  app.view = view;
  // One request at a time per view: the next poll starts 2 s after the last answer. A view that
  // does not poll (one letter, the contracts) is asked again until it loaded once.
  let loaded = false;
  do {
    if (!document.hidden) {
      try {
        await view.refresh();
        if (generation !== app.generation) return;
        loaded = true;
        setLive(null);
      } catch (error) {
        if (generation !== app.generation) return;
        setLive(error.message);
      }
    }
    await sleep(POLL_MS);
  } while ((view.poll || !loaded) && generation === app.generation);
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
