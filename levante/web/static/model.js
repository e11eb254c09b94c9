// The model page: facts, prices, starter prompts, team cost calculator, status.
import { h, api, money, count, alertBox, showAlert } from "./dom.js";

export function mountModel(root, ctx) {
  let timer = null;
  let closed = false;
  root.replaceChildren(h("div", { class: "page" }, h("p", { class: "muted" }, "Loading…")));
  ctx.modelInfo().then(
    (info) => {
      if (closed) return;
      document.title = `${info.name} · Levante`;
      const calc = calculator((fn) => { clearTimeout(timer); timer = setTimeout(fn, 250); });
      root.replaceChildren(h("div", { class: "page" }, hero(info), starters(info), calc, statusTable(info)));
    },
    (err) => root.replaceChildren(h("div", { class: "empty-state" }, h("p", { class: "empty-title" }, "Could not load the model"), h("p", { class: "muted" }, err.message))),
  );
  return () => { closed = true; clearTimeout(timer); };
}

const perMillion = (usd) => (usd == null ? "—" : `${money(usd)} / 1M`);

function hero(info) {
  const fact = (label, value) => h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, value));
  const price = (label, usd) => h("div", { class: "price" }, h("span", { class: "muted small" }, label), h("strong", {}, money(usd)), h("span", { class: "muted small" }, "per 1M tokens"));
  return h("section", { class: "hero" },
    h("div", { class: "card hero-main" },
      h("p", { class: "eyebrow" }, "Model"),
      h("h1", { "data-testid": "model-name" }, info.name),
      h("dl", { class: "facts" },
        fact("Context", `${count(info.context_length)} tokens`),
        fact("Max output", `${count(info.max_output)} tokens`),
        fact("Input", info.modalities.join(" + ")),
        fact("Tools", info.tools ? "Yes" : "No"))),
    h("div", { class: "card hero-prices" },
      h("h2", {}, "Prices"),
      h("div", { class: "prices" },
        price("Input", info.prices.input),
        price("Output", info.prices.output),
        info.prices.cached_input == null ? null : price("Cached input", info.prices.cached_input))));
}

function starters(info) {
  return h("section", { class: "section" },
    h("h2", {}, "Start with a prompt"),
    h("div", { class: "starters" }, info.starters.map((s, i) =>
      h("article", { class: "card starter", "data-testid": "starter" },
        h("h3", {}, s.title),
        h("p", { class: "starter-prompt" }, s.prompt),
        h("div", { class: "starter-foot" },
          s.needs_image ? h("span", { class: "badge" }, "needs an image") : h("span", {}),
          h("a", { class: "btn btn-small", href: `/?starter=${i}`, "data-testid": "open-in-space" }, "Open in a Space →"))))));
}

// The estimate comes from the server (GET /web/api/cost), so it always matches real billing.
function calculator(debounce) {
  const field = (label, testid, value, min) => {
    const input = h("input", { type: "number", inputmode: "numeric", min, step: 1, value: String(value), "data-testid": testid, id: testid });
    return [h("div", { class: "calc-field" }, h("label", { for: testid }, label), input), input];
  };
  const [seatsF, seats] = field("Seats", "calc-seats", 5, 1);
  const [msgsF, msgs] = field("Messages per seat per day", "calc-messages", 80, 1);
  const [inF, inTok] = field("Input tokens per message", "calc-input-tokens", 500, 1);
  const [outF, outTok] = field("Output tokens per message", "calc-output-tokens", 300, 1);
  const cost = h("output", { class: "calc-cost", "data-testid": "calc-cost", "aria-live": "polite" }, "…");
  const detail = h("p", { class: "muted small" });
  const error = alertBox("calc-error");
  let latest = 0; // only the newest request may paint the result

  async function update() {
    const ticket = ++latest;
    const q = new URLSearchParams({ seats: seats.value, messages_per_day: msgs.value, input_tokens: inTok.value, output_tokens: outTok.value, days: 30 });
    try {
      const r = await api(`/cost?${q}`);
      if (ticket !== latest) return;
      cost.textContent = money(r.cost);
      cost.dataset.usd = String(r.cost);
      detail.textContent = `${count(r.messages)} messages · ${count(r.input_tokens)} input + ${count(r.output_tokens)} output tokens`;
      showAlert(error, "");
      cost.classList.remove("stale");
    } catch (err) {
      if (ticket !== latest) return;
      showAlert(error, err.message);
      cost.classList.add("stale");
    }
  }

  const section = h("section", { class: "card calc", "aria-label": "Team cost calculator" },
    h("div", { class: "calc-inputs" },
      h("h2", {}, "What would your team spend?"),
      h("div", { class: "calc-grid" }, seatsF, msgsF, inF, outF)),
    h("div", { class: "calc-result" },
      h("p", { class: "muted small" }, "Estimated cost for 30 days"),
      cost, detail, error));
  section.addEventListener("input", () => debounce(update));
  update();
  return section;
}

function statusTable(info) {
  const st = info.status;
  const dash = (v, fmt) => (v == null ? "—" : fmt(v));
  const cells = [
    "this server",
    `${count(info.context_length)}`,
    perMillion(info.prices.input),
    perMillion(info.prices.output),
    dash(st.p50_latency, (s) => `${s.toFixed(2)} s`),
    dash(st.throughput, (t) => `${t.toFixed(1)} tok/s`),
    dash(st.uptime, (u) => `${(u * 100).toFixed(2)}%`),
  ];
  const heads = ["Provider", "Context", "Input", "Output", "P50 latency", "Throughput", `${st.window_days}-day uptime`];
  return h("section", { class: "section" },
    h("h2", {}, "Status"),
    h("div", { class: "card table-wrap" },
      h("table", { class: "status", "data-testid": "status-table" },
        h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, h("tr", {}, cells.map((c, i) => h("td", { "data-label": heads[i] }, c)))))),
    h("p", { class: "muted small" }, `${count(st.requests)} requests in the last ${st.window_days} days.`));
}
