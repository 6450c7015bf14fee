/* The compare view: a step x tensor heat map of a compare report (colour: log of max abs error or of 1 - cosine),
   the first divergence marked, and a cell's error histogram and worst positions on click.
   StagepipeCompare.render(root, view, detail): view is pipeline.tools.compare_view.compare_view()'s dict;
   detail(step, file) returns a Promise of cell_detail()'s dict (from the server, or from the data the HTML
   report carries). */
(function () {
  "use strict";
  const {fmt, el, histogram} = window.StagepipeCharts;
  const STOPS = [[255, 255, 204], [254, 217, 118], [253, 141, 60], [227, 26, 28], [128, 0, 38]];
  const FLOOR = 1e-12;  // the smallest error the log scale goes down to
  const EXACT = "#e3f1e6";  // cells whose tensors are equal

  function colour(t) {
    t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
    const c = STOPS[i].map((v, k) => Math.round(v + f * (STOPS[i + 1][k] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function cellValue(cell, metric) {
    if (!cell) return null;
    if (metric === "cosine") return cell.cosine === null ? null : Math.max(0, 1 - cell.cosine);
    return cell.max_abs_err;
  }

  function scale(view, metric) {
    let lo = Infinity, hi = -Infinity;
    for (const row of view.heat.rows) for (const cell of row.cells) {
      const v = cellValue(cell, metric);
      if (v === null || v === 0) continue;  // exact matches have their own colour
      const x = Math.log10(Math.max(v, FLOOR));
      lo = Math.min(lo, x); hi = Math.max(hi, x);
    }
    if (lo === Infinity) { lo = Math.log10(FLOOR); hi = 0; }
    if (hi - lo < 1e-9) hi = lo + 1;
    return {lo, hi, t: (v) => (Math.log10(Math.max(v, FLOOR)) - lo) / (hi - lo)};
  }

  function verdict(view, onFirst) {
    const f = view.first_failure;
    if (f) {
      return el("div", {class: "verdict fail", id: "verdict"}, "First divergence: ",
        el("a", {href: "#", class: "goto-first", onclick: (e) => { e.preventDefault(); onFirst(); }}, f.path),
        " ", el("span", {class: "reason"}, "— " + f.reason),
        el("div", {class: "reason"}, `${view.tensors_exceeding} of ${view.tensors_compared} tensors in ` +
          `${view.common_steps} common steps exceed the tolerance; ${view.token_mismatches} token mismatch(es)`));
    }
    if (!view.ok) {
      return el("div", {class: "verdict fail", id: "verdict"}, view.token_mismatches ?
        `${view.token_mismatches} token mismatch(es), every tensor within tolerance` :
        "steps or tensor files present in one run only (--strict)");
    }
    return el("div", {class: "verdict ok", id: "verdict"},
      `OK: all ${view.tensors_compared} tensors in ${view.common_steps} common steps are within tolerance`);
  }

  function table(view, metric, onCell) {
    const s = scale(view, metric), first = view.heat.first;
    const head = el("tr", {}, el("th", {}, "step"), el("th", {}, "mode"),
      view.heat.columns.map((c) => el("th", {title: c.file}, c.file.replace(/\.npy$/, ""),
        el("span", {class: "stage"}, c.stage))));
    const rows = view.heat.rows.map((row) => el("tr", {},
      el("td", {class: "step"}, row.step), el("td", {class: "muted"}, row.only_in ? `only in ${row.only_in}` :
        `${row.mode || "-"} ${row.past_len ?? ""}+${row.q_len ?? ""}`),
      row.cells.map((cell, i) => {
        const file = view.heat.columns[i].file;
        if (!cell) return el("td", {class: "cell missing", title: "not in both runs"});
        const v = cellValue(cell, metric);
        const isFirst = first && first.step === row.step && first.file === file;
        const broken = v === null ? (cell.reason && cell.reason.includes("NaN") ? "nan" : "missing") : "";
        const cls = ["cell", cell.exceeds ? "exceeds" : "", isFirst ? "first-divergence" : "", broken].join(" ");
        const t = v === null ? 0 : s.t(v);
        const td = el("td", {class: cls, "data-step": row.step, "data-file": file,
          title: `${row.step}/${file}\nmax abs err ${fmt(cell.max_abs_err)}  cosine ${cell.cosine === null ? "-" :
            cell.cosine.toFixed(6)}${cell.reason ? "\n" + cell.reason : ""}`,
          style: v === null ? null : v === 0 ? `background:${EXACT}` :
            `background:${colour(t)};color:${t > 0.6 ? "#fff" : "#111"}`,
          onclick: () => onCell(row.step, file, td)},
          (isFirst ? "▶ " : "") + (broken ? (broken === "nan" ? "NaN" : "✕") : fmt(v)));
        return td;
      })));
    const legend = el("span", {class: "legend"}, el("span", {class: "swatch", style: `background:${EXACT}`}), "equal ·",
      fmt(10 ** s.lo), el("span", {class: "bar"}), fmt(10 ** s.hi),
      el("span", {class: "muted"}, metric === "cosine" ? "1 − cosine (log)" : "max abs error (log)"));
    return {table: el("table", {class: "heat", id: "heat"}, el("thead", {}, head), el("tbody", {}, rows)), legend};
  }

  function detailPanel(cell, d) {
    const panel = el("div", {});
    panel.append(el("h2", {}, `${d.step} / ${d.file} `, el("span", {class: "muted"}, `(${d.stage})`)));
    if (cell && cell.reason) panel.append(el("div", {class: "verdict fail"}, el("span", {class: "reason"}, cell.reason)));
    if (cell) {
      panel.append(el("dl", {class: "kv"},
        el("dt", {}, "max abs error"), el("dd", {class: "mono"}, fmt(cell.max_abs_err)),
        el("dt", {}, "cosine"), el("dd", {class: "mono"}, cell.cosine === null ? "-" : cell.cosine.toFixed(8)),
        el("dt", {}, "mse"), el("dd", {class: "mono"}, fmt(cell.mse)),
        el("dt", {}, "rows compared"), el("dd", {}, cell.real_rows === null ? "all" : `first ${cell.real_rows} (real tokens)`),
        el("dt", {}, "check"), el("dd", {}, cell.check === "equal" ? "must be equal" : "allclose + cosine"),
        cell.note ? [el("dt", {}, "note"), el("dd", {}, cell.note)] : null));
    }
    if (d.error) { panel.append(el("div", {class: "error-box"}, d.error)); return panel; }
    panel.append(el("p", {class: "muted"}, `${d.size} elements: ${d.exact} exactly equal, ${d.nan} NaN; ` +
      `shape ${d.shape_a.join("x")}${d.note ? " (" + d.note + ")" : ""}`));
    const split = el("div", {class: "split"});
    const canvas = el("canvas", {id: "error-histogram"});
    split.append(el("div", {}, el("h2", {}, "error histogram (|A − B|, log bins)"),
      d.counts.length ? el("div", {class: "chart"}, canvas) : el("p", {class: "muted"}, "no differing element")));
    split.append(el("div", {}, el("h2", {}, "worst positions"),
      el("table", {class: "grid", id: "worst"}, el("thead", {}, el("tr", {}, ["index", "A", "B", "|A − B|"].map((h) => el("th", {}, h)))),
        el("tbody", {}, d.worst.map((w) => el("tr", {}, el("td", {class: "mono"}, "[" + w.index.join(", ") + "]"),
          el("td", {class: "num"}, fmt(w.a)), el("td", {class: "num"}, fmt(w.b)), el("td", {class: "num"}, fmt(w.abs_err))))))));
    panel.append(split);
    if (d.counts.length) {
      setTimeout(() => histogram(canvas, d.edges, d.counts, {logY: true, color: "#e45756", xTitle: "|A − B|",
        label: (a, b) => `${fmt(a)}–${fmt(b)}`}), 0);
    }
    return panel;
  }

  function tokens(view) {
    if (!view.tokens.length) return null;
    return el("div", {}, el("h2", {}, "sampled tokens"), el("table", {class: "grid"},
      el("thead", {}, el("tr", {}, ["step", "token A", "token B", "", "text A", "text B"].map((h) => el("th", {}, h)))),
      el("tbody", {}, view.tokens.map((t) => el("tr", {class: t.match === false ? "selected" : ""},
        el("td", {class: "mono"}, t.step), el("td", {class: "num"}, t.token_a ?? "-"), el("td", {class: "num"}, t.token_b ?? "-"),
        el("td", {}, t.match === false ? el("span", {class: "badge bad"}, "mismatch") : t.match === null ? "one run only" : ""),
        el("td", {}, el("span", {class: "tok"}, t.text_a ?? "-")), el("td", {}, el("span", {class: "tok"}, t.text_b ?? "-")))))));
  }

  function render(root, view, detail) {
    root.replaceChildren();
    let metric = "max_abs_err";
    const tol = view.tolerance;
    const detailBox = el("section", {class: "detail", id: "cell-detail"},
      el("p", {class: "muted"}, "Click a cell for its error histogram and worst positions."));
    const heatBox = el("div", {class: "heat-wrap"}), legendBox = el("span", {});
    const cellOf = (row, file) => view.heat.rows.find((r) => r.step === row)
      .cells[view.heat.columns.findIndex((c) => c.file === file)];
    async function open(step, file, td) {
      root.querySelectorAll("td.cell.selected").forEach((n) => n.classList.remove("selected"));
      if (td) td.classList.add("selected");
      detailBox.replaceChildren(el("p", {class: "muted"}, `loading ${step}/${file} …`));
      try {
        detailBox.replaceChildren(detailPanel(cellOf(step, file), await detail(step, file)));
      } catch (e) {
        detailBox.replaceChildren(el("div", {class: "error-box"}, String(e.message || e)));
      }
      detailBox.scrollIntoView({block: "nearest"});
    }
    function redraw() {
      const {table: t, legend} = table(view, metric, open);
      heatBox.replaceChildren(t);
      legendBox.replaceChildren(legend);
    }
    const first = () => {
      const f = view.heat.first;
      if (f) open(f.step, f.file, root.querySelector("td.cell.first-divergence"));
    };
    const radio = (value, label) => el("label", {}, el("input", {type: "radio", name: "metric", value,
      checked: value === metric, onchange: () => { metric = value; redraw(); }}), " " + label);
    root.append(verdict(view, first),
      el("p", {class: "muted"}, `A: ${view.run_a} (${view.steps_a} steps)  ·  B: ${view.run_b} (${view.steps_b} ` +
        `steps, the reference)  ·  atol ${tol.atol}, rtol ${tol.rtol}, min cosine ${tol.min_cosine}; ` +
        "hidden/logits over real rows; outlined cells exceed the tolerance; ▶ marks the first divergence"),
      el("div", {class: "controls"}, el("span", {}, "colour:"), radio("max_abs_err", "max abs error"),
        radio("cosine", "1 − cosine"), legendBox),
      heatBox, detailBox, tokens(view));
    redraw();
  }

  window.StagepipeCompare = {render, colour};
})();
