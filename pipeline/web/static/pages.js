/* The run browser's pages (runs, run, step) and the compare page, drawn from the /api/ JSON. A run that is
   generating is polled: its page grows as step folders appear. */
(function () {
  "use strict";
  const {fmt, el, histogram, stacked, draw} = window.StagepipeCharts;
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const enc = encodeURIComponent;

  async function api(url) {
    const r = await fetch(url);
    const body = await r.json().catch(() => ({error: `${r.status} ${r.statusText}`}));
    if (!r.ok) throw new Error(body.error || `${r.status}`);
    return body;
  }

  function fail(root, e) {
    root.replaceChildren(el("div", {class: "error-box"}, String(e.message || e)));
  }

  const ms = (x) => x === null || x === undefined ? "-" : x.toFixed(1);
  const secs = (x) => x === null || x === undefined ? "-" : `${x.toFixed(3)} s`;
  const rate = (x) => x === null || x === undefined ? "-" : `${x.toFixed(1)} tok/s`;
  const card = (label, value, id) => el("div", {class: "card", id}, el("div", {class: "value"}, value),
    el("div", {class: "label"}, label));
  const th = (...names) => el("tr", {}, names.map((n) => el("th", {}, n)));
  const statusBadge = (r) => r.live ? el("span", {class: "badge live"}, "generating") :
    r.stop_reason ? el("span", {class: "badge"}, r.stop_reason) : el("span", {class: "badge"}, "no summary");

  // -- runs list -----------------------------------------------------------------------------------------------
  async function index() {
    const root = document.getElementById("runs");
    let timer = null;
    async function refresh() {
      try {
        const data = await api("/api/runs");
        if (!data.runs.length) {
          root.replaceChildren(el("p", {class: "muted"}, `No runs yet. Make one: stagepipe run --run_root ${data.root}/demo`));
        } else {
          root.replaceChildren(el("table", {class: "grid", id: "runs-table"}, el("thead", {},
            th("run", "status", "steps", "new tokens", "TTFT", "decode", "prompt", "modified")),
            el("tbody", {}, data.runs.map((r) => el("tr", {},
              el("td", {}, el("a", {href: `/run?run=${enc(r.name)}`}, r.name), r.chat ? " 💬" : ""),
              el("td", {}, r.problem ? el("span", {class: "badge bad"}, "damaged") : statusBadge(r)),
              el("td", {class: "num"}, r.steps), el("td", {class: "num"}, r.generated ?? "-"),
              el("td", {class: "num"}, secs(r.ttft_s)), el("td", {class: "num"}, rate(r.decode_tokens_per_s)),
              el("td", {}, (r.prompt || "").slice(0, 80)),
              el("td", {class: "muted"}, r.modified ? new Date(r.modified * 1000).toLocaleString() : "-"))))));
        }
        for (const [id, pick] of [["pick-a", 0], ["pick-b", 1]]) {
          const select = document.getElementById(id), keep = select.value;
          select.replaceChildren(...data.runs.map((r) => el("option", {}, r.name)));
          select.value = keep || (data.runs[pick] || data.runs[0] || {}).name || "";
        }
        clearTimeout(timer);
        if (data.runs.some((r) => r.live)) timer = setTimeout(refresh, 2000);
      } catch (e) { fail(root, e); }
    }
    refresh();
  }

  // -- one run -------------------------------------------------------------------------------------------------
  function stepsTable(info) {
    return el("table", {class: "grid", id: "steps-table"},
      el("thead", {}, th("step", "mode", "past_len", "q_len", "input tokens", "next token",
        ...info.stages.map((s) => `${s} ms`), "total ms")),
      el("tbody", {}, info.steps.map((s) => el("tr", {"data-step": s.dir},
        el("td", {}, el("a", {href: `/step?run=${enc(info.name)}&step=${enc(s.dir)}`}, s.dir)),
        el("td", {}, s.error ? el("span", {class: "badge bad", title: s.error}, "bad meta.json") : s.mode || "-"),
        el("td", {class: "num"}, s.past_len ?? "-"), el("td", {class: "num"}, s.q_len ?? "-"),
        el("td", {title: (s.input_token_ids || []).join(" ")}, el("span", {class: "tok"}, s.input_text ??
          (s.input_token_ids || []).join(" "))),
        el("td", {}, s.next_token_id === null ? "-" : [`${s.next_token_id} `, el("span", {class: "tok"}, s.next_token_text ?? "")]),
        info.stages.map((st) => el("td", {class: "num"}, ms(s.stages_ms[st]))),
        el("td", {class: "num"}, ms(s.total_ms))))));
  }

  function kvSection(box, kv) {
    const files = kv.files.filter((f) => !f.error);
    const canvas = el("canvas", {id: "kv-chart"});
    const rec = kv.cache;
    box.replaceChildren(
      el("p", {class: "muted"}, rec ? `cache.json: ${rec.max_cache_len} slots, ${rec.kv_dtype}; ` +
        `the last step says ${kv.expected_filled} slots are filled` : "no cache.json"),
      el("div", {class: "chart", style: "height:180px"}, canvas),
      el("table", {class: "grid", id: "kv-table"}, el("thead", {}, th("file", "shape", "dtype", "non-zero slots", "last non-zero slot")),
        el("tbody", {}, kv.files.map((f) => el("tr", {}, el("td", {class: "mono"}, f.file),
          f.error ? el("td", {colspan: 4, class: "muted"}, f.error) : [
            el("td", {class: "mono"}, f.shape.join("x")), el("td", {}, f.dtype),
            el("td", {class: "num"}, f.slots === null ? "-" : `${f.nonzero_slots}/${f.slots}`),
            el("td", {class: "num"}, f.last_nonzero_slot ?? "-")])))));
    draw(canvas, {type: "bar", data: {labels: files.map((f) => f.file.replace(/^past_|\.npy$/g, "")), datasets: [
      {label: "filled slots", data: files.map((f) => f.nonzero_slots), backgroundColor: "#4c78a8"},
      {label: "empty slots", data: files.map((f) => f.slots - f.nonzero_slots), backgroundColor: "#dde3ec"}]},
      options: {indexAxis: "y", scales: {x: {stacked: true, max: rec ? rec.max_cache_len : undefined,
        title: {display: true, text: "cache slots"}}, y: {stacked: true}}}});
  }

  async function run() {
    const root = document.getElementById("run"), badge = document.getElementById("live");
    const parts = {cards: el("div", {class: "cards"}), text: el("div", {}), chart: el("canvas", {id: "stage-chart"}),
                   table: el("div", {}), kv: el("div", {id: "kv"}, el("p", {class: "muted"}, "loading …")),
                   settings: el("div", {})};
    let built = false, wasLive = null;
    async function loadKv(info) {
      if (!info.has_kv) { parts.kv.replaceChildren(el("p", {class: "muted"}, "no kv_cache folder yet")); return; }
      try { kvSection(parts.kv, await api(`/api/kv?run=${enc(page.run)}`)); } catch (e) { fail(parts.kv, e); }
    }
    async function refresh() {
      let info;
      try { info = await api(`/api/run?run=${enc(page.run)}`); } catch (e) { fail(root, e); return; }
      if (!built) {
        root.replaceChildren(parts.cards, parts.text, el("h2", {}, "time per stage"),
          el("div", {class: "chart"}, parts.chart), el("h2", {}, "steps"), parts.table,
          el("h2", {}, "KV cache fill"), parts.kv, el("h2", {}, "settings (run.json)"), parts.settings,
          el("p", {}, el("a", {href: `/compare?a=${enc(page.run)}`}, "compare this run with another …")));
        built = true;
      }
      const sum = info.summary || {}, r = info.rates;
      badge.replaceChildren(info.live ? el("span", {class: "badge live", id: "live-badge"}, "generating") : "");
      parts.cards.replaceChildren(card("steps", info.steps.length, "card-steps"),
        card("new tokens", sum.generated_token_ids ? sum.generated_token_ids.length :
          info.steps.filter((s) => s.next_token_id !== null).length),
        card("stop reason", info.live ? "running" : sum.stop_reason || "-"),
        card(`time to first token (${r.source})`, secs(r.ttft_s)), card("decode", rate(r.decode_tokens_per_s)));
      const s = info.settings || {};
      parts.text.replaceChildren(
        el("dl", {class: "kv"}, el("dt", {}, "prompt"), el("dd", {}, el("span", {class: "tok"}, s.prompt ?? "-")),
          el("dt", {}, "reply"), el("dd", {}, el("span", {class: "tok", id: "reply"}, sum.text ??
            info.steps.map((x) => x.next_token_text || "").join("")))));
      parts.table.replaceChildren(stepsTable(info));
      const series = {};
      for (const st of info.stages) series[st] = info.steps.map((x) => x.stages_ms[st] ?? 0);
      stacked(parts.chart, info.steps.map((x) => x.dir.replace("step_", "")), series, "ms");
      parts.settings.replaceChildren(el("dl", {class: "kv"}, Object.entries(s).filter(([k]) => k !== "prompt")
        .map(([k, v]) => [el("dt", {}, k), el("dd", {class: "mono"}, typeof v === "object" ? JSON.stringify(v) : String(v))])));
      if (wasLive !== info.live) loadKv(info);  // the cache changes with every step: read it on load and at the end
      wasLive = info.live;
      if (info.live) setTimeout(refresh, 1000);
    }
    refresh();
  }

  // -- one step ------------------------------------------------------------------------------------------------
  async function step() {
    const root = document.getElementById("step");
    let info;
    try { info = await api(`/api/step?run=${enc(page.run)}&step=${enc(page.step)}`); } catch (e) { fail(root, e); return; }
    const m = info.meta || {};
    const detail = el("section", {class: "detail", id: "tensor-detail"}, el("p", {class: "muted"},
      "Click a tensor for its histogram."));
    async function open(t, tr) {
      root.querySelectorAll("tr.selected").forEach((n) => n.classList.remove("selected"));
      tr.classList.add("selected");
      try {
        const d = await api(`/api/tensor?run=${enc(page.run)}&step=${enc(page.step)}&file=${enc(t.file)}`);
        const canvas = el("canvas", {id: "tensor-histogram"});
        detail.replaceChildren(el("h2", {}, `${t.file} values`), el("p", {class: "muted"},
          `${d.size} elements, ${d.nan} NaN, ${d.inf} Inf; histogram of the finite values` +
          (m.mode === "prefill" && m.q_len < m.max_input_len ? ` (padding rows ${m.q_len}.. included)` : "")),
          el("div", {class: "chart"}, canvas));
        histogram(canvas, d.histogram.edges, d.histogram.counts, {xTitle: "value"});
      } catch (e) { fail(detail, e); }
    }
    root.replaceChildren(
      el("dl", {class: "kv"}, ["mode", "past_len", "q_len", "next_past_len", "attention_window", "max_input_len",
        "max_cache_len", "backend", "next_token_id"].map((k) => [el("dt", {}, k), el("dd", {class: "mono"}, m[k] ?? "-")]),
        el("dt", {}, "input tokens"), el("dd", {}, el("span", {class: "tok"}, info.input_text ?? "-"), " ",
          el("span", {class: "muted mono"}, (m.input_token_ids || []).join(" "))),
        el("dt", {}, "next token"), el("dd", {}, el("span", {class: "tok"}, info.next_token_text ?? "-")),
        el("dt", {}, "stages"), el("dd", {}, info.stages.map((s) => `${s.stage} ${ms(s.ms)} ms`).join(" · "))),
      el("h2", {}, "tensors"),
      el("table", {class: "grid", id: "tensors-table"}, el("thead", {}, th("file", "shape", "dtype", "min", "max", "mean", "std", "NaN", "Inf")),
        el("tbody", {}, info.tensors.map((t) => {
          const tr = el("tr", {class: "clickable", "data-file": t.file}, el("td", {class: "mono"}, t.file),
            t.error ? el("td", {colspan: 8, class: "muted"}, t.error) : [
              el("td", {class: "mono"}, t.shape.join("x") || "scalar"), el("td", {}, t.dtype),
              ["min", "max", "mean", "std"].map((k) => el("td", {class: "num"}, fmt(t[k]))),
              el("td", {class: "num"}, t.nan), el("td", {class: "num"}, t.inf)]);
          if (!t.error) tr.addEventListener("click", () => open(t, tr));
          return tr;
        }))),
      detail);
  }

  // -- compare ---------------------------------------------------------------------------------------------------
  async function compare() {
    const root = document.getElementById("compare");
    if (!page.a || !page.b) return;
    root.replaceChildren(el("p", {class: "muted"}, `comparing ${page.a} with ${page.b} …`));
    try {
      const view = await api(`/api/compare?${page.query}`);
      StagepipeCompare.render(root, view, (step, file) =>
        api(`/api/compare/cell?a=${enc(page.a)}&b=${enc(page.b)}&step=${enc(step)}&file=${enc(file)}`));
    } catch (e) { fail(root, e); }
  }

  window.StagepipePages = {index, run, step, compare};
})();
