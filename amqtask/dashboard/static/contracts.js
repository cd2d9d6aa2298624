// Contracts: each task's queue, retry policy, and input and output schema.

import { h, count, panel, empty, api } from "./ui.js";

function retryText(retry) {
  if (!retry) return "–";
  const { attempts, initial, backoff, max_delay: max, on } = retry;
  if (attempts <= 1) return "no retries (1 attempt)";
  const trigger = on?.length ? `; on ${on.join(", ")}` : "";
  return `${attempts} attempts, ${initial} s then ×${backoff} up to ${max} s${trigger}`;
}

export function contractsView(main) {
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
          h(
            "div",
            { class: "panel-head" },
            h("h2", {}, c.name, h("span", { class: "version" }, ` v${c.version}`)),
            h("span", { class: "tag" }, c.calls === "transient" ? "transient calls" : "durable"),
          ),
          h(
            "dl",
            { class: "facts" },
            [
              ["Queue", `${c.queue} (${c.queue_type})`],
              ["Routing key", c.routing_key],
              [
                "Max length",
                c.max_length === null || c.max_length === undefined
                  ? "unbounded"
                  : `${count(c.max_length)} (${c.overflow})`,
              ],
              ["Delivery limit", c.delivery_limit ?? "–"],
              ["Retry", retryText(c.retry)],
            ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v ?? "–"))]),
          ),
          h(
            "details",
            {},
            h("summary", {}, "Input schema"),
            h("pre", { class: "code" }, JSON.stringify(c.input, null, 2)),
          ),
          h(
            "details",
            {},
            h("summary", {}, "Output schema"),
            h("pre", { class: "code" }, JSON.stringify(c.output, null, 2)),
          ),
        ),
      ),
    );
  }
  return { refresh, poll: false };
}
